//! The language table: names and aliases, file extensions, and the
//! interpreters resolved once at start to real paths (never a shim script).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Serialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Language {
    Python,
    Javascript,
    Bash,
    Go,
}

impl Language {
    pub const ALL: [Language; 4] = [
        Language::Python,
        Language::Javascript,
        Language::Bash,
        Language::Go,
    ];

    /// The language a client's spelling names, aliases of API.md included.
    pub fn from_alias(name: &str) -> Option<Language> {
        match name.trim().to_ascii_lowercase().as_str() {
            "python" | "python3" | "py" => Some(Language::Python),
            "javascript" | "js" | "node" | "nodejs" => Some(Language::Javascript),
            "bash" | "sh" | "shell" => Some(Language::Bash),
            "go" | "golang" => Some(Language::Go),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Language::Python => "python",
            Language::Javascript => "javascript",
            Language::Bash => "bash",
            Language::Go => "go",
        }
    }

    /// File name the code is written to inside the run directory.
    pub fn file_name(self) -> &'static str {
        match self {
            Language::Python => "main.py",
            Language::Javascript => "main.js",
            Language::Bash => "main.sh",
            Language::Go => "main.go",
        }
    }

    /// Executable names looked up on PATH, in order.
    fn candidates(self) -> &'static [&'static str] {
        match self {
            Language::Python => &["python3", "python"],
            Language::Javascript => &["node", "nodejs"],
            Language::Bash => &["bash"],
            Language::Go => &["go"],
        }
    }

    /// Arguments that print the real executable path, for interpreters that
    /// are commonly reached through shims (pyenv, nvm, asdf).
    fn self_path_args(self) -> Option<&'static [&'static str]> {
        match self {
            Language::Python => Some(&["-c", "import sys; print(sys.executable)"]),
            Language::Javascript => Some(&["-p", "process.execPath"]),
            Language::Bash | Language::Go => None,
        }
    }

    fn version_args(self) -> &'static [&'static str] {
        match self {
            Language::Go => &["version"],
            _ => &["--version"],
        }
    }

    /// The program and arguments that run the code file `file` with
    /// `interpreter`.
    /// The variable that adds a directory to where the interpreter finds
    /// modules, and the directory for `working_dir`: the code runs from a
    /// file in its run directory, so without it a module or package in the
    /// working directory (`import mymod`, `require("pkg")`) is not found.
    pub fn module_path(self, working_dir: &Path) -> Option<(&'static str, PathBuf)> {
        match self {
            Language::Python => Some(("PYTHONPATH", working_dir.to_path_buf())),
            // CommonJS's `require` of a package; an ES module's `import` of
            // one looks only beside the file.
            Language::Javascript => Some(("NODE_PATH", working_dir.join("node_modules"))),
            Language::Bash | Language::Go => None,
        }
    }

    pub fn command(self, interpreter: &Path, file: &Path) -> (PathBuf, Vec<String>) {
        let path = file.to_string_lossy().into_owned();
        match self {
            // Unbuffered, so output is visible while the program runs.
            Language::Python => (interpreter.to_path_buf(), vec!["-u".into(), path]),
            // Built beside the code, then run in the build's place: `go run`
            // would end with its own code 1 and "exit status N" on stderr
            // for a program that exits N. A build error ends it with go's
            // code and message.
            Language::Go => {
                let binary = file.with_file_name("main").to_string_lossy().into_owned();
                let script = r#""$0" build -o "$1" "$2" && exec "$1""#;
                let args = vec![
                    "-c".into(),
                    script.into(),
                    interpreter.to_string_lossy().into_owned(),
                    binary,
                    path,
                ];
                (PathBuf::from("/bin/sh"), args)
            }
            Language::Javascript | Language::Bash => (interpreter.to_path_buf(), vec![path]),
        }
    }
}

/// An installed interpreter, resolved once.
#[derive(Clone, Debug, Serialize)]
pub struct Interpreter {
    pub language: Language,
    pub path: PathBuf,
    pub version: String,
}

/// The interpreters found at start.
#[derive(Clone, Debug, Default)]
pub struct Languages(BTreeMap<Language, Interpreter>);

impl Languages {
    /// Finds every language's interpreter on PATH, in parallel (a shim can
    /// take a few hundred milliseconds to answer).
    pub fn detect() -> Languages {
        Languages::detect_then(|_| ())
    }

    /// As `detect`, telling `tell` of each interpreter as soon as its own
    /// probe ends (the agent starts the warm Python interpreter while the
    /// slower probes still run).
    pub fn detect_then(tell: impl Fn(&Interpreter) + Sync) -> Languages {
        let tell = &tell;
        let found = std::thread::scope(|scope| {
            let probes: Vec<_> = Language::ALL
                .into_iter()
                .map(|language| {
                    scope.spawn(move || {
                        let interpreter = resolve(language);
                        if let Some(interpreter) = &interpreter {
                            tell(interpreter);
                        }
                        interpreter
                    })
                })
                .collect();
            probes
                .into_iter()
                .filter_map(|probe| probe.join().ok().flatten())
                .collect::<Vec<_>>()
        });
        Languages(found.into_iter().map(|i| (i.language, i)).collect())
    }

    pub fn get(&self, language: Language) -> Option<&Interpreter> {
        self.0.get(&language)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Interpreter> {
        self.0.values()
    }
}

fn resolve(language: Language) -> Option<Interpreter> {
    let found = language
        .candidates()
        .iter()
        .find_map(|name| which::which(name).ok())?;
    // Run as found, and kept as the interpreter says it is: a virtualenv's
    // `python3` is a link to the base interpreter, and only the venv's own
    // path makes it the venv's (its packages). A shim (pyenv, nvm, asdf)
    // prints the real interpreter behind it. The interpreter itself is not
    // asked: it would print the path it was found at (node took 90-120 ms
    // to say so, most of the agent's start-up).
    let mut path = found;
    if let Some(args) = language
        .self_path_args()
        .filter(|_| !is_the_interpreter(&path, language))
    {
        let real = Command::new(&path).args(args).output().ok()?;
        if !real.status.success() {
            return None;
        }
        let printed = String::from_utf8_lossy(&real.stdout).trim().to_string();
        if Path::new(&printed).is_absolute() {
            path = printed.into();
        }
    }
    if !path.is_absolute() {
        path = std::fs::canonicalize(&path).unwrap_or(path);
    }
    if language == Language::Go {
        // `go` may be a wrapper too; the real tool lives under GOROOT.
        if let Ok(out) = Command::new(&path).args(["env", "GOROOT"]).output() {
            let root = String::from_utf8_lossy(&out.stdout).trim().to_string();
            let go = Path::new(&root).join("bin/go");
            if go.is_file() {
                path = go;
            }
        }
    }
    let out = Command::new(&path)
        .args(language.version_args())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    // Python 2 printed its version on stderr; take whichever has text.
    let text = if out.stdout.is_empty() {
        out.stderr
    } else {
        out.stdout
    };
    let version = String::from_utf8_lossy(&text)
        .lines()
        .next()
        .unwrap_or_default()
        .trim()
        .to_string();
    Some(Interpreter {
        language,
        path,
        version,
    })
}

/// Whether `path` is the interpreter itself rather than a shim in front of
/// it: an ELF executable whose own name, links followed, is the
/// language's (`python3.11` for `python3`). A shim is a script (pyenv,
/// asdf) or a link to a program of another name (volta, mise), and tells
/// where the interpreter is only when run.
fn is_the_interpreter(path: &Path, language: Language) -> bool {
    let Ok(real) = std::fs::canonicalize(path) else {
        return false;
    };
    let named = real
        .file_name()
        .and_then(|name| name.to_str())
        .is_some_and(|name| language.candidates().iter().any(|c| name.starts_with(c)));
    let mut magic = [0u8; 4];
    let elf = std::fs::File::open(&real)
        .and_then(|mut file| std::io::Read::read_exact(&mut file, &mut magic))
        .is_ok_and(|()| magic == *b"\x7fELF");
    named && elf
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aliases_of_the_contract_name_their_language() {
        for (alias, language) in [
            ("python", Language::Python),
            ("python3", Language::Python),
            ("javascript", Language::Javascript),
            ("js", Language::Javascript),
            ("node", Language::Javascript),
            ("nodejs", Language::Javascript),
            ("bash", Language::Bash),
            ("sh", Language::Bash),
            ("shell", Language::Bash),
            ("go", Language::Go),
            ("Python", Language::Python),
        ] {
            assert_eq!(Language::from_alias(alias), Some(language), "{alias}");
        }
        assert_eq!(Language::from_alias("cobol"), None);
    }

    #[test]
    fn only_an_interpreter_by_its_own_name_is_taken_as_it_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let at = |name: &str| dir.path().join(name);
        // A script, as pyenv's and asdf's shims are.
        std::fs::write(at("script"), "#!/bin/sh\nexec python3 \"$@\"\n").unwrap();
        std::os::unix::fs::symlink(at("script"), at("python3")).unwrap();
        assert!(!is_the_interpreter(&at("python3"), Language::Python));
        // A program of another name, as volta's and mise's shims are.
        let other = which::which("true").unwrap();
        std::os::unix::fs::symlink(&other, at("node")).unwrap();
        assert!(!is_the_interpreter(&at("node"), Language::Javascript));
        // The interpreter itself, through a link of its own (a venv's).
        let real = std::process::Command::new("python3")
            .args(["-c", "import sys; print(sys.executable)"])
            .output()
            .unwrap();
        let real = String::from_utf8(real.stdout).unwrap();
        std::os::unix::fs::symlink(real.trim(), at("venv-python3")).unwrap();
        assert!(is_the_interpreter(&at("venv-python3"), Language::Python));
        assert!(!is_the_interpreter(&at("missing"), Language::Python));
    }

    #[test]
    fn bash_is_found_as_a_real_file() {
        let languages = Languages::detect();
        let bash = languages.get(Language::Bash).expect("bash is installed");
        assert!(bash.path.is_absolute() && bash.path.is_file());
        assert!(bash.version.contains("bash"), "{}", bash.version);
    }
}
