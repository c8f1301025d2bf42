"""Image pipelines (Stable Diffusion through ``diffusers``) for the image endpoints.

* ``pipeline_dir``: what a diffusers pipeline directory holds (``model_index.json``, its
  components and their weights), read without importing torch; the errors of a directory
  that is none.
* ``params``: one request's parameters (``ImageParams``) and the events a generation reports
  (``ImageEvent``), shared by the API, the orchestration and the wire codec.
* ``runner``: ``DiffusionRunner``, which loads a pipeline with diffusers on the torch device
  and generates PNGs, one denoising step reported at a time (imports torch and diffusers).
"""
