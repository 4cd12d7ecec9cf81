"""KOALA against SGD with momentum and AdamW on real data that every machine has.

    pip install "koala-triton[compare]"
    python -m koala_triton.compare            # 2 tasks x 4 optimizers x 3 seeds
    python -m koala_triton.compare --short    # the quick start: fewer steps, 1 seed
    python -m koala_triton.compare --cifar ~/data/cifar10 --seeds 1   # GPU: the paper's recipe

Tasks (nothing is downloaded):

- digits: scikit-learn's handwritten digits (1797 8x8 images; 1347 train, 450 test), a
  38,282-parameter CNN, batches of 32; test accuracy.
- stdlib-lm: a character-level transformer (2 layers, width 64) trained on the top-level source
  files of Python's standard library, every 10th file held out; test perplexity per character.
- --cifar DIR: ResNet-18 on a CIFAR-10/100 folder (torchvision's download folder or train/ and
  test/ image folders) with the KOALA authors' recipe: 100 epochs of batch 128, random crop
  and flip, weight decay 5e-4 for every optimizer, every lr x0.2 at epochs 30, 60, 90;
  baselines SGD (lr 0.01, momentum 0.9) and Adam (lr 1e-3).

Optimizers (``contenders.py``, one entry each): KoalaM, KoalaV and KOALA++ (``KoalaPlusPlus``)
at their defaults; SGD with momentum (lr 0.01, momentum 0.9) and AdamW (lr 1e-3, weight decay
0.01). Same initial weights and batch order for every
optimizer of a seed; no learning-rate schedule on the small tasks.

Output: a progress bar; results.md (a table per task: final test accuracy or perplexity and
test loss, mean ± std over seeds), results.json (every curve) and one PNG per task, under
--out (default ./koala_compare). Uses the GPU when there is one (--device to choose).
"""

from .cli import main

__all__ = ["main"]
