//! The `polyhub` binary: command line, configuration and wiring of every component.

fn main() {
    println!("polyhub");
}
