//! fs-core: a deterministic, sans-IO filesystem core that models the Linux iomap layer.
