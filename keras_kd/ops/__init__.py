"""Backend-agnostic tensor operations used by keras-kd losses."""
