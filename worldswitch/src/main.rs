//! `worldswitch`: see, run, measure and debug world switchers.
//!
//! Everything lives in the library crate; run `worldswitch --help`.

fn main() -> std::process::ExitCode {
    worldswitch::main()
}
