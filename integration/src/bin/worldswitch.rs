//! `worldswitch`: see, run, measure and debug world switchers.
//!
//! Everything lives in [`integration::cli`]; run `worldswitch --help`.

fn main() -> std::process::ExitCode {
    integration::cli::main()
}
