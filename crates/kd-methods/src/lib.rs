//! kd-methods: data, metrics, the trainer and the KD methods.
