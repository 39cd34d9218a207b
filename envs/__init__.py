"""Gymnasium environments of refocus-ray (importing registers them with RLlib by name)."""

from envs.frame_selection import ENV_NAME, FrameSelectionVectorEnv, make_vector_env

__all__ = ["ENV_NAME", "FrameSelectionVectorEnv", "make_vector_env"]
