//! Services in containers, through testcontainers (feature `testcontainers`).
