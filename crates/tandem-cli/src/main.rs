//! `tandem`: run Llama-family models.

fn main() {
    std::process::exit(tandem_cli::main_with_args(std::env::args_os()));
}
