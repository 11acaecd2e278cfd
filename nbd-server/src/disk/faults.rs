//! Seeded fault injection settings.

/// Which faults to inject, and how often. Every decision comes from one ChaCha generator
/// seeded with `seed`, drawn in request-arrival order, so a run with the same requests and
/// seed injects the same faults.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FaultConfig {
    pub seed: u64,
    /// Probability (0..=1) that a READ fails with EIO.
    pub eio_read: f64,
    /// Probability that a WRITE, TRIM or WRITE_ZEROES fails with EIO (and changes nothing).
    pub eio_write: f64,
    /// Probability that a FLUSH fails with EIO (and makes nothing durable).
    pub eio_flush: f64,
    /// Added latency, in microseconds, for a request picked at `latency_rate`.
    pub latency_us: u32,
    pub latency_rate: f64,
}

impl FaultConfig {
    /// Whether any fault can be injected.
    pub fn active(&self) -> bool {
        self.eio_read > 0.0
            || self.eio_write > 0.0
            || self.eio_flush > 0.0
            || (self.latency_us > 0 && self.latency_rate > 0.0)
    }

    /// Checks rates are probabilities.
    pub fn validate(&self) -> Result<(), String> {
        for (name, v) in [
            ("eio-read", self.eio_read),
            ("eio-write", self.eio_write),
            ("eio-flush", self.eio_flush),
            ("latency-rate", self.latency_rate),
        ] {
            if !(0.0..=1.0).contains(&v) {
                return Err(format!("{name}={v} is not a probability in 0..=1"));
            }
        }
        Ok(())
    }
}
