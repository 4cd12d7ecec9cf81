"""Triton kernels of the fused path (imported only by ``koala_triton._triton_impl``).

``tables`` builds the host-side pointer and chunk tables (pure torch), ``passes`` holds the
elementwise multi-tensor passes, ``filter`` the one-program scalar filter kernel, and
``launch`` picks the compiled (CUDA) or interpreted (CPU, ``TRITON_INTERPRET=1``) form of a
kernel and counts launches. Design, bytes and launch counts: NOTES.md beside this file.
"""
