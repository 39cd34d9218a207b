"""The Ray Serve application of the selector (`serve run serve.app:app`); logic lives in
`refocus_ray.service`. Run from the project root (see README: not an installed package)."""
