"""The ``TORCH_LOGS="grouter_diff"`` log channel."""
