//! kd-model: a BERT encoder built on kd-kernels.
