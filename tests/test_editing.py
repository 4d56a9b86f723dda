"""Editing: the sampler completing a partial token grid (EAR.sample_tokens with known tokens)."""
import numpy as np
import pytest
import torch

from models.ear import EAR
from test_files import export  # noqa: F401 (fixture)

HEAD_SIZES = {"energy": dict(scoreloss_d=1, scoreloss_w=16, noise_channels=8),
              "diffusion": dict(diffloss_d=1, diffloss_w=16, num_sampling_steps=5),
              "gmm": dict(gmm_components=4, gmm_d=1, gmm_w=16)}


def tiny(head: str) -> EAR:
    """16 tokens of 4 values (16x16 images, stride 4), randomly initialised but for the heads'
    zero-initialised output layers, which are perturbed so every head's draws depend on z."""
    torch.manual_seed(0)
    model = EAR(img_size=16, vae_stride=4, patch_size=1, vae_embed_dim=4, decoder_embed_dim=32,
                decoder_depth=1, decoder_num_heads=4, class_num=3, buffer_size=2, head=head,
                **HEAD_SIZES[head])
    with torch.no_grad():
        for p in model.head.parameters():
            if not p.any():
                p.normal_(std=0.1)
    return model.eval()


def sample(model, seed: int, labels, cfg: float, **known) -> torch.Tensor:
    torch.manual_seed(seed)
    return model.sample_tokens(len(labels), num_iter=5, cfg=cfg, labels=labels, **known)


@pytest.mark.parametrize("head", sorted(HEAD_SIZES))
@pytest.mark.parametrize("cfg", [1.0, 2.5])
def test_nothing_known_is_the_ordinary_sampler_and_known_tokens_stay(head, cfg):
    model, labels = tiny(head), torch.tensor([0, 2, 1])
    ordinary = sample(model, 7, labels, cfg)
    known = torch.randn(3, 4, 4, 4)
    nothing = torch.zeros(3, 16, dtype=torch.bool)
    assert torch.equal(sample(model, 7, labels, cfg, known=known, known_mask=nothing), ordinary)

    keep = torch.zeros(3, 16, dtype=torch.bool)
    keep[0, :6], keep[1, 10:], keep[2, ::3] = True, True, True  # six tokens per row, in places
    edited = sample(model, 7, labels, cfg, known=known, known_mask=keep)
    tokens, given = model.patchify(edited), model.patchify(known)
    assert torch.equal(tokens[keep], given[keep])  # bit for bit
    assert not torch.isclose(tokens[~keep], given[~keep]).any()  # the rest was generated
    assert torch.isfinite(edited).all()

    everything = torch.ones(3, 16, dtype=torch.bool)
    assert torch.equal(sample(model, 7, labels, cfg, known=known, known_mask=everything), known)


def test_the_schedule_runs_over_the_unknown_tokens_only():
    """Known tokens are never masked; min(num_iter, U) steps fill the U unknown ones, the cosine
    schedule over U; the linear guidance counts the known tokens as known."""
    model, seen = tiny("energy"), []
    transformer = model.forward_transformer

    def watch(tokens, cls_emb, mask):
        seen.append(mask[:2].clone())
        return transformer(tokens, cls_emb, mask)
    model.forward_transformer = watch
    steps = []
    head_sample = model.head.sample
    model.head.sample = lambda z, t, cfg: steps.append((len(z), cfg)) or head_sample(z, t, cfg)
    keep = torch.zeros(2, 16, dtype=torch.bool)
    keep[:, :13] = True  # 3 unknown tokens
    torch.manual_seed(0)
    model.sample_tokens(2, num_iter=8, cfg=3.0, labels=torch.tensor([0, 1]),
                        known=torch.randn(2, 4, 4, 4), known_mask=keep)
    assert len(seen) == 3  # capped by the 3 unknown tokens
    assert not any(m[keep].any() for m in seen)  # a known token is never masked
    assert [int(m.sum()) // 2 for m in seen] == [3, 2, 1]
    # Rows: conditional + unconditional, one token per image per step; the share known after
    # each step is 14/16, 15/16 (the last step keeps the schedule's floor of one, as always).
    assert [n for n, _ in steps] == [4, 4, 4]
    assert [c for _, c in steps] == pytest.approx([1 + 2 * 14 / 16, 1 + 2 * 15 / 16, 1 + 2 * 15 / 16])


def test_bad_known_inputs_are_refused():
    model, known = tiny("energy"), torch.randn(2, 4, 4, 4)
    keep = torch.zeros(2, 16, dtype=torch.bool)
    with pytest.raises(ValueError, match="pass both or neither"):
        model.sample_tokens(2, num_iter=2, known=known)
    with pytest.raises(ValueError, match=r"\(2, 16\) bool"):
        model.sample_tokens(2, num_iter=2, known=known, known_mask=keep[:, :8])
    with pytest.raises(ValueError, match="latents must have shape"):
        model.sample_tokens(2, num_iter=2, known=known[:, :2], known_mask=keep)
    keep[0, 0] = True
    with pytest.raises(ValueError, match=r"same number of tokens, got \[0, 1\]"):
        model.sample_tokens(2, num_iter=2, known=known, known_mask=keep)


# ----- sample_ear.py --edit / --edit_npz on a small digits model (random weights) ---------------

def digits_edit_inputs():
    """Three held-out digits with the bottom half, the right half and a centre square to
    regenerate: 8, 8 and 4 of the 16 tokens (2x2-pixel tokens)."""
    from util.digits import digits_split
    _, _, images, labels = digits_split()
    masks = np.zeros((3, 8, 8), bool)
    masks[0, 4:], masks[1, :, 4:], masks[2, 2:6, 2:6] = True, True, True
    return images[:3], masks, labels[:3]


def test_edit_npz_completes_every_image_and_keeps_its_pixels(export, tmp_path, capsys):  # noqa: F811
    import sample_ear
    images, masks, labels = digits_edit_inputs()
    np.savez(tmp_path / "in.npz", images=images, masks=masks, labels=labels)
    sample_ear.main(*sample_ear.parse_args([
        "--resume", str(export[0]), "--edit_npz", str(tmp_path / "in.npz"), "--samples_per_class",
        "2", "--num_iter", "4", "--cfg", "2.0", "--device", "cpu", "--out", str(tmp_path / "out.npz")]))
    assert "completed 3 images x 2" in capsys.readouterr().out
    with np.load(tmp_path / "out.npz") as f:
        assert sorted(f) == ["completions", "images", "labels", "masks"]
        assert np.array_equal(f["images"], images) and np.array_equal(f["labels"], labels)
        done = f["completions"]
    assert done.shape == (3, 2, 8, 8) and done.dtype == np.uint8
    keep = ~masks[:, None].repeat(2, 1)
    # Pixel tokens: the kept pixels come back exactly, without --paste.
    assert np.array_equal(done[keep], images[:, None].repeat(2, 1)[keep])
    assert (done[~keep] != images[:, None].repeat(2, 1)[~keep]).any()


def test_edit_writes_a_grid_of_input_mask_and_completions(export, tmp_path):  # noqa: F811
    from PIL import Image

    import sample_ear
    images, masks, _ = digits_edit_inputs()
    Image.fromarray(images[0]).save(tmp_path / "digit.png")
    Image.fromarray((masks[0] * 255).astype(np.uint8)).save(tmp_path / "mask.png")
    out = tmp_path / "grid.png"
    sample_ear.main(*sample_ear.parse_args([
        "--resume", str(export[0]), "--edit", str(tmp_path / "digit.png"), "--mask",
        str(tmp_path / "mask.png"), "--class_ids", "3", "5", "--samples_per_class", "3",
        "--num_iter", "4", "--paste", "--device", "cpu", "--out", str(out)]))
    grid = np.asarray(Image.open(out).convert("L"))
    cell = 8 + 2  # save_grid: 2 pixels of padding
    assert grid.shape == (2 + 2 * cell, 2 + 5 * cell)
    for row in range(2):
        top = 2 + row * cell
        tiles = [grid[top:top + 8, 2 + c * cell:2 + c * cell + 8] for c in range(5)]
        assert np.array_equal(tiles[0], images[0]) and np.array_equal(tiles[1], masks[0] * 255)
        for tile in tiles[2:]:
            assert np.array_equal(tile[:4], images[0][:4])  # the kept top half, pasted


@pytest.mark.parametrize("case, expected", [
    ("mask_size", "--mask {tmp}/mask.png: 4x4 pixels, expected the size of --edit"),
    ("mask_none", "the mask regenerates no whole token"),
    ("mask_all", "the mask keeps no whole token"),
    ("image", "--edit {tmp}/digit.png: not a readable image"),
    ("alone", "--edit IMAGE needs --mask MASK"),
    ("npz_key", "--edit_npz {tmp}/in.npz: no masks"),
    ("npz_shape", "--edit_npz {tmp}/in.npz: images is uint8 (3, 8, 7), expected uint8 (3, 8, 8)"),
    ("npz_out", "--out {tmp}/out.png: with --edit_npz the completions go to an .npz file"),
])
def test_bad_edit_inputs_are_refused_by_name(export, tmp_path, case, expected):  # noqa: F811
    from PIL import Image

    from refusals import refused
    images, masks, labels = digits_edit_inputs()
    mask = {"mask_size": np.zeros((4, 4)), "mask_none": np.zeros((8, 8)),
            "mask_all": np.ones((8, 8))}.get(case, masks[0])
    Image.fromarray(images[0]).save(tmp_path / "digit.png")
    Image.fromarray((mask * 255).astype(np.uint8)).save(tmp_path / "mask.png")
    if case == "image":
        (tmp_path / "digit.png").write_bytes(b"not a picture")
    arrays = dict(images=images, masks=masks, labels=labels)
    if case == "npz_key":
        del arrays["masks"]
    if case == "npz_shape":
        arrays["images"] = images[:, :, :7]
    np.savez(tmp_path / "in.npz", **arrays)
    common = ["--resume", export[0], "--num_iter", 4, "--device", "cpu", "--class_ids", 3]
    if case.startswith("npz"):
        argv = [*common, "--edit_npz", tmp_path / "in.npz",
                "--out", tmp_path / ("out.png" if case == "npz_out" else "out.npz")]
    else:
        argv = [*common, "--edit", tmp_path / "digit.png", "--out", tmp_path / "grid.png",
                *([] if case == "alone" else ["--mask", tmp_path / "mask.png"])]
    message = refused("sample_ear.py", argv, watch=[tmp_path, export[0]])
    assert expected.format(tmp=tmp_path) in message


def test_a_token_is_kept_when_all_or_any_of_its_pixels_are():
    from util.editing import token_mask
    model = tiny("energy")  # 16x16 pixels, 4x4-pixel tokens on a 4x4 grid
    keep = torch.zeros(1, 16, 16, dtype=torch.bool)
    keep[0, :4, :] = True     # the whole first row of tokens
    keep[0, 4:8, 4:6] = True  # half of token (1, 1)
    keep[0, 15, 15] = True    # one pixel of the last token
    every = token_mask(keep, 4, "all")
    some = token_mask(keep, 4, "any")
    assert every[0].nonzero().flatten().tolist() == [0, 1, 2, 3]
    assert some[0].nonzero().flatten().tolist() == [0, 1, 2, 3, 5, 15]
    # Ordered as EAR.patchify orders the tokens of the (stride 4) latent grid over these pixels.
    latents = -torch.nn.functional.max_pool2d(-keep[:, None].float(), 4)  # 1 where all are kept
    assert torch.equal(model.patchify(latents.expand(1, 4, 4, 4)).amin(dim=2) > 0, every)
    with pytest.raises(ValueError, match="--mask_rule 'most'"):
        token_mask(keep, 4, "most")
