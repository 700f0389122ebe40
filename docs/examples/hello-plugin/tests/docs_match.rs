//! docs/plugins.md shows this crate's files and ../hello.c verbatim: this
//! test fails when one of them changes without the other, so the walk-through
//! always shows code that builds and passes its tests.

const DOC: &str = include_str!("../../../plugins.md");

fn assert_shown(language: &str, file: &str, text: &str) {
    let block = format!("```{language}\n{text}```\n");
    assert!(
        DOC.contains(&block),
        "docs/plugins.md must show {file} verbatim in a ```{language} block"
    );
}

#[test]
fn the_walk_throughs_show_these_files() {
    assert_shown("toml", "Cargo.toml", include_str!("../Cargo.toml"));
    assert_shown("rust", "src/lib.rs", include_str!("../src/lib.rs"));
    assert_shown("c", "../hello.c", include_str!("../../hello.c"));
}
