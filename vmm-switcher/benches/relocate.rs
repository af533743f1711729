//! Relocation benchmark (filled in with the template tests).
fn main() {}
