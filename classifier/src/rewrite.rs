//! SKELETON — the parser helper replaces this file.
