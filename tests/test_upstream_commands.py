"""Every command in the reference release's README must parse here as written."""
import re
import shlex

import pytest

from util.args import cache_parser, train_parser

# Copied verbatim from the reference release's README (launcher prefix removed).
UPSTREAM = {
    "cache": """main_cache.py \\
--img_size 256 --vae_path pretrained_models/vae/kl16.ckpt --vae_embed_dim 16 \\
--batch_size 128 \\
--data_path ${IMAGENET_PATH} --cached_path ${CACHED_PATH}""",
    "train": """main_ear.py \\
--img_size 256 --vae_path pretrained_models/vae/kl16.ckpt --vae_embed_dim 16 --vae_stride 16 --patch_size 1 \\
--score_lrscale 0.25 --train_temperature 1.0 --alpha 1.0 \\
--model ear_base --scoreloss_d 6 --scoreloss_w 1024 --noise_channels 64 \\
--epochs 750 --warmup_epochs 100 --batch_size 32 --blr 1e-4 --score_batch_mul 2 \\
--cfg 3.0 --cfg_schedule linear --accumulation_steps 2 \\
--output_dir ${OUTPUT_DIR} --resume ${OUTPUT_DIR} --online_eval --eval_freq 50 \\
--use_cached --cached_path ${CACHED_PATH} --data_path ${IMAGENET_PATH}""",
    "finetune": """main_ear.py \\
--img_size 256 --vae_path pretrained_models/vae/kl16.ckpt --vae_embed_dim 16 --vae_stride 16 --patch_size 1 \\
--score_lrscale 0.25 --train_temperature 0.99 --infer_temperature 0.7 --alpha 1.0 \\
--model ear_base --scoreloss_d 6 --scoreloss_w 1024 --noise_channels 64 \\
--epochs 800 --warmup_epochs 100 --batch_size 32 --blr 7e-5 --score_batch_mul 2 \\
--cfg 3.0 --cfg_schedule linear --accumulation_steps 2 \\
--output_dir ${OUTPUT_DIR} --resume ${OUTPUT_DIR} --online_eval --eval_freq 5 \\
--use_cached --cached_path ${CACHED_PATH} --data_path ${IMAGENET_PATH}""",
    "evaluate": """main_ear.py \\
--model ear_base --scoreloss_d 6 --scoreloss_w 1024 \\
--eval_bsz 128 --num_images 50000 \\
--num_iter 64 --cfg 3.0 --cfg_schedule linear --infer_temperature 0.7 \\
--output_dir ${OUTPUT_DIR} \\
--resume ${OUTPUT_DIR} \\
--data_path ${IMAGENET_PATH} --evaluate""",
}


def parse(name):
    words = shlex.split(re.sub(r"\$\{(\w+)\}", r"/tmp/\1", UPSTREAM[name].replace("\\\n", " ")))
    parser = cache_parser() if words[0] == "main_cache.py" else train_parser()
    return parser.parse_args(words[1:])


@pytest.mark.parametrize("name", sorted(UPSTREAM))
def test_upstream_command_parses(name):
    args = parse(name)
    assert args.data_path == "/tmp/IMAGENET_PATH"


def test_upstream_values_land_where_expected():
    ft = parse("finetune")
    # --cfg and --infer_temperature take lists (a sweep); one value is a one-element list.
    assert (ft.train_temperature, ft.infer_temperature, ft.blr, ft.epochs) == (0.99, [0.7], 7e-5, 800)
    assert (ft.cfg, ft.cfg_schedule, ft.accumulation_steps, ft.online_eval) == ([3.0], "linear", 2, True)
    ev = parse("evaluate")
    assert (ev.evaluate, ev.eval_bsz, ev.num_images, ev.resume) == (True, 128, 50000, "/tmp/OUTPUT_DIR")
