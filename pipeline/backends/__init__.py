"""Runners that execute a model for verification and timing.

Every runner takes numpy feeds by input name and returns numpy outputs by output name, so the
verifier and the timer treat PyTorch and every compiled variant alike. Heavy libraries are
imported inside the runner that needs them: importing this package costs nothing.
"""
