"""ADM-style centre crop, the preprocessing behind ImageNet FID reference statistics."""
import numpy as np
from PIL import Image


def center_crop_arr(pil_image: Image.Image, image_size: int) -> Image.Image:
    """Square `image_size` crop from the centre of the image.

    While the short side is at least twice the target, halve the image with a box filter
    (cheap, alias-free); then resize bicubically so the short side equals the target; then crop.
    """
    while min(pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(s // 2 for s in pil_image.size), resample=Image.BOX)
    scale = image_size / min(pil_image.size)
    pil_image = pil_image.resize(tuple(round(s * scale) for s in pil_image.size),
                                 resample=Image.BICUBIC)
    arr = np.asarray(pil_image)
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return Image.fromarray(arr[top:top + image_size, left:left + image_size])
