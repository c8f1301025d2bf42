"""The tinygrad engine (``pip install -e .[tinygrad]``; needs a system clang on CPU)."""
