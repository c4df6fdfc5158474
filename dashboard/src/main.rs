//! The page's entry point; everything else is in the library so browser tests can reach it.

fn main() {
    renkei_dashboard::run();
}
