//! Key configuration (helper fills this in).
