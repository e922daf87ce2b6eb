fn main() {
    std::process::exit(londiste_rs::cli::main());
}
