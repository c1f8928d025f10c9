// The migrations are embedded by `sqlx::migrate!`: rebuild when they change.
// The commit built, when built from a git checkout, goes into `/info` and
// `execd --version` (`EXECD_COMMIT`), so an operator can tell an upgrade
// took; rebuilt when the checked-out commit changes.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
    println!("cargo:rerun-if-changed=.git/HEAD");
    if let Ok(head) = std::fs::read_to_string(".git/HEAD") {
        if let Some(reference) = head.trim().strip_prefix("ref: ") {
            println!("cargo:rerun-if-changed=.git/{reference}");
        }
    }
    println!("cargo:rerun-if-changed=.git/packed-refs");
    let commit = std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|out| out.status.success())
        .and_then(|out| String::from_utf8(out.stdout).ok());
    let version = std::env::var("CARGO_PKG_VERSION").unwrap_or_default();
    match commit {
        Some(commit) => {
            println!("cargo:rustc-env=EXECD_COMMIT={}", commit.trim());
            println!(
                "cargo:rustc-env=EXECD_VERSION={version} ({})",
                commit.trim()
            );
        }
        None => println!("cargo:rustc-env=EXECD_VERSION={version}"),
    }
}
