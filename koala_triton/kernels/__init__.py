"""Triton kernels of the fused path (imported only by ``koala_triton._triton_backend``).

``tables`` builds the host-side pointer and chunk tables (pure torch), ``passes`` holds the
elementwise multi-tensor passes, ``kalman`` the one-program scalar filter kernel,
``constants`` the globals they read, ``direct`` the direct launches, and
``launch`` picks the compiled (CUDA) or interpreted (CPU, ``TRITON_INTERPRET=1``) form of a
kernel and counts launches. Design, bytes and launch counts: NOTES.md beside this file.
"""
