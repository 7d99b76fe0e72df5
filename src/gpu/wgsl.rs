//! WGSL source composition: the line preprocessor every kernel goes through before it is
//! compiled, the shared snippets under `shaders/common/` that its `#include` resolves to, and
//! [`compose`], the exact text [`super::Gpu::pipeline`] hands to the shader compiler for a variant.
//!
//! WGSL has no conditional compilation and no includes, so this is done here, on lines:
//!
//! - `#if NAME`, `#if !NAME`, `#else`, `#endif` (nestable), where NAME is a `Bool` const of the
//!   variant. A binding that a variant does not use must not be declared (auto layouts drop it, and
//!   binding it is an error), so kernels select their bindings with these.
//! - `#include "name.wgsl"` pastes `shaders/common/name.wgsl` (itself preprocessed with the same
//!   consts). The files are embedded at build time ([`COMMON`]); nothing is read at run time.
//!   Each file is included at most once per kernel (a second `#include` of it, or one reached
//!   through another included file, adds nothing), and a file that includes itself, directly or
//!   through others, is an error. The included text is appended *after* the including file —
//!   WGSL declarations may come in any order — so that every line of a kernel keeps its line
//!   number in the compiled text, and a compiler error points at the right line of the `.wgsl`.
//!
//! Directive lines and lines of inactive branches become empty lines for the same reason. Any
//! other line starting with `#` is an error (WGSL itself never starts a line with `#`).

use super::ConstVal;

/// The files under `shaders/common/` that `#include` may name, embedded at build time. (A unit
/// test checks that this list matches the folder.)
pub const COMMON: &[(&str, &str)] = &[
    (
        "activations.wgsl",
        include_str!("../../shaders/common/activations.wgsl"),
    ),
    (
        "box_decode.wgsl",
        include_str!("../../shaders/common/box_decode.wgsl"),
    ),
    ("scan.wgsl", include_str!("../../shaders/common/scan.wgsl")),
    (
        "sort_key.wgsl",
        include_str!("../../shaders/common/sort_key.wgsl"),
    ),
];

/// The `const NAME: TYPE = VALUE;` lines that make a kernel variant, in the order given.
pub fn const_header(consts: &[(&str, ConstVal)]) -> String {
    let mut header = String::new();
    for (k, v) in consts {
        header.push_str(&format!("const {k}: {} = {};\n", v.ty(), v.lit()));
    }
    header
}

/// The full WGSL of one kernel variant as the runtime compiles it: the const header, then the
/// preprocessed kernel source (with its includes appended). `tests/shader_contract.rs` parses
/// exactly this.
pub fn compose(source: &str, consts: &[(&str, ConstVal)]) -> Result<String, String> {
    let body = preprocess(source, consts)?;
    Ok(format!("{}{body}", const_header(consts)))
}

/// Runs the preprocessor over a kernel source for one variant's consts. Errors name the line
/// (`line 12: ...`), and for an included file the file and the line that included it.
pub fn preprocess(source: &str, consts: &[(&str, ConstVal)]) -> Result<String, String> {
    preprocess_with(source, consts, COMMON)
}

/// [`preprocess`] with `#include` resolved in `lib` instead of [`COMMON`] (unit tests).
fn preprocess_with(
    source: &str,
    consts: &[(&str, ConstVal)],
    lib: &[(&'static str, &'static str)],
) -> Result<String, String> {
    let mut pp = Preprocessor {
        consts,
        lib,
        stack: Vec::new(),
        done: Vec::new(),
        appended: String::new(),
    };
    let mut out = pp.file(source)?;
    out.push_str(&pp.appended);
    Ok(out)
}

struct Preprocessor<'a> {
    consts: &'a [(&'a str, ConstVal)],
    /// What `#include` may name: (file name, text).
    lib: &'a [(&'static str, &'static str)],
    /// The includes being expanded, outermost first: (file, line of its `#include`).
    stack: Vec<(&'static str, usize)>,
    /// Files already included (each is included once).
    done: Vec<&'static str>,
    /// The included files' text, appended after the kernel's own.
    appended: String,
}

/// One open `#if`: whether its current branch is active, whether the enclosing branch is, whether
/// its `#else` was seen, and the line it opened on.
struct Cond {
    active: bool,
    parent: bool,
    seen_else: bool,
    line: usize,
}

impl Preprocessor<'_> {
    /// Where an error is: `line N` in the kernel, or `line N of common/x.wgsl (included from ...)`.
    fn at(&self, line: usize) -> String {
        let Some((file, _)) = self.stack.last() else {
            return format!("line {line}");
        };
        let from: Vec<String> = (0..self.stack.len())
            .rev()
            .map(|k| match k {
                0 => format!("line {}", self.stack[0].1),
                _ => format!("line {} of common/{}", self.stack[k].1, self.stack[k - 1].0),
            })
            .collect();
        format!(
            "line {line} of common/{file} (included from {})",
            from.join(", from ")
        )
    }

    fn flag(&self, expr: &str, line: usize) -> Result<bool, String> {
        let (neg, name) = match expr.strip_prefix('!') {
            Some(n) => (true, n.trim()),
            None => (false, expr),
        };
        let ident = !name.is_empty()
            && !name.starts_with(|c: char| c.is_ascii_digit())
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !ident {
            return Err(format!(
                "{}: `#if {expr}`: expected one bool const name, optionally negated with `!`",
                self.at(line)
            ));
        }
        match self.consts.iter().find(|(k, _)| *k == name) {
            Some((_, ConstVal::Bool(b))) => Ok(*b != neg),
            Some((_, v)) => Err(format!(
                "{}: #if {name}: const {name} is a {}, not a bool",
                self.at(line),
                v.ty()
            )),
            None => Err(format!(
                "{}: #if {name}: const {name} not given for this variant",
                self.at(line)
            )),
        }
    }

    /// Preprocesses one file; returns its text (line for line) and appends its includes.
    fn file(&mut self, source: &str) -> Result<String, String> {
        let mut out = String::with_capacity(source.len());
        let mut conds: Vec<Cond> = Vec::new();
        for (i, text) in source.lines().enumerate() {
            let line = i + 1;
            let t = text.trim();
            let active = conds.last().is_none_or(|c| c.active);
            if let Some(d) = t.strip_prefix('#') {
                let (word, rest) = match d.find(|c: char| c.is_whitespace()) {
                    Some(p) => (&d[..p], d[p..].trim()),
                    None => (d, ""),
                };
                // `#else` and `#endif` may carry a trailing `// comment`.
                let bare = rest.is_empty() || rest.starts_with("//");
                match word {
                    "if" => {
                        let v = if active {
                            self.flag(rest, line)?
                        } else {
                            false
                        };
                        conds.push(Cond {
                            active: v,
                            parent: active,
                            seen_else: false,
                            line,
                        });
                    }
                    "else" if bare => {
                        let at = self.at(line);
                        let c = conds
                            .last_mut()
                            .ok_or_else(|| format!("{at}: #else without #if"))?;
                        if c.seen_else {
                            return Err(format!(
                                "{at}: second #else for the #if of line {}",
                                c.line
                            ));
                        }
                        c.seen_else = true;
                        c.active = c.parent && !c.active;
                    }
                    "endif" if bare => {
                        if conds.pop().is_none() {
                            return Err(format!("{}: #endif without #if", self.at(line)));
                        }
                    }
                    "include" => {
                        if active {
                            self.include(rest, line)?;
                        }
                    }
                    _ => {
                        return Err(format!(
                            "{}: unknown preprocessor directive `{t}` (known: #if NAME, #if !NAME, \
                             #else, #endif, #include \"name.wgsl\")",
                            self.at(line)
                        ))
                    }
                }
            } else if active {
                out.push_str(text);
            }
            // Keep line numbers of compile errors aligned with the .wgsl file.
            out.push('\n');
        }
        if let Some(c) = conds.last() {
            return Err(format!(
                "{}: unterminated #if (no #endif before the end of the file)",
                self.at(c.line)
            ));
        }
        Ok(out)
    }

    fn include(&mut self, arg: &str, line: usize) -> Result<(), String> {
        let name = arg
            .strip_prefix('"')
            .and_then(|r| r.strip_suffix('"'))
            .filter(|n| !n.is_empty() && !n.contains('"'))
            .ok_or_else(|| {
                format!(
                    "{}: `#include {arg}`: expected #include \"name.wgsl\"",
                    self.at(line)
                )
            })?;
        let Some(&(file, text)) = self.lib.iter().find(|(f, _)| *f == name) else {
            let known: Vec<&str> = self.lib.iter().map(|(f, _)| *f).collect();
            return Err(format!(
                "{}: #include \"{name}\": no such file in shaders/common/ (known: {})",
                self.at(line),
                known.join(", ")
            ));
        };
        if self.stack.iter().any(|(f, _)| *f == file) {
            let mut chain: Vec<&str> = self.stack.iter().map(|(f, _)| *f).collect();
            chain.push(file);
            return Err(format!(
                "{}: #include \"{name}\": include cycle {}",
                self.at(line),
                chain.join(" -> ")
            ));
        }
        if self.done.contains(&file) {
            return Ok(());
        }
        self.stack.push((file, line));
        let body = self.file(text)?;
        self.stack.pop();
        self.done.push(file);
        self.appended
            .push_str(&format!("// ---- #include \"{file}\" ----\n"));
        self.appended.push_str(&body);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(name: &'static str, v: bool) -> (&'static str, ConstVal) {
        (name, ConstVal::Bool(v))
    }

    /// The kept (non-empty) lines.
    fn kept(s: &str) -> Vec<&str> {
        s.lines().filter(|l| !l.trim().is_empty()).collect()
    }

    #[test]
    fn plain_source_passes_through_line_for_line() {
        let src = "fn f() -> u32 {\n    return 1u;\n}\n";
        assert_eq!(preprocess(src, &[]).unwrap(), src);
    }

    #[test]
    fn if_else_endif_and_negation() {
        let src = "a\n#if A\nb\n#else\nc\n#endif\n#if !A\nd\n#endif // not A\ne";
        assert_eq!(
            kept(&preprocess(src, &[b("A", true)]).unwrap()),
            ["a", "b", "e"]
        );
        assert_eq!(
            kept(&preprocess(src, &[b("A", false)]).unwrap()),
            ["a", "c", "d", "e"]
        );
    }

    #[test]
    fn nesting_inactive_parent_wins() {
        let src = "#if A\n#if B\nab\n#else\na_not_b\n#endif\n#else\n#if B\nb_not_a\n#else\nneither\n#endif\n#endif";
        for (a, bb, want) in [
            (true, true, "ab"),
            (true, false, "a_not_b"),
            (false, true, "b_not_a"),
            (false, false, "neither"),
        ] {
            let out = preprocess(src, &[b("A", a), b("B", bb)]).unwrap();
            assert_eq!(kept(&out), [want], "A={a} B={bb}");
        }
        // An #else inside an inactive branch must not switch anything on.
        let src = "#if A\n#if B\nx\n#else\ny\n#endif\n#endif";
        assert!(kept(&preprocess(src, &[b("A", false), b("B", true)]).unwrap()).is_empty());
    }

    #[test]
    fn line_numbers_are_kept() {
        let src = "l1\n#if A\nl3\n#else\nl5\n#endif\nl7";
        let out = preprocess(src, &[b("A", false)]).unwrap();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 7);
        assert_eq!(lines[4], "l5");
        assert_eq!(lines[6], "l7");
    }

    #[test]
    fn unknown_or_non_bool_const_is_an_error_with_its_line() {
        let e = preprocess("x\n\n#if NOPE\ny\n#endif", &[b("A", true)]).unwrap_err();
        assert!(e.starts_with("line 3:") && e.contains("NOPE"), "{e}");
        let e = preprocess("#if N\n#endif", &[("N", ConstVal::U32(3))]).unwrap_err();
        assert!(e.contains("not a bool"), "{e}");
        let e = preprocess("#if A && B\n#endif", &[b("A", true)]).unwrap_err();
        assert!(e.contains("expected one bool const name"), "{e}");
        // Not evaluated inside an inactive branch.
        assert!(preprocess("#if A\n#if NOPE\n#endif\n#endif", &[b("A", false)]).is_ok());
    }

    #[test]
    fn unbalanced_directives_are_errors() {
        let e = preprocess("a\n#if A\nb\n", &[b("A", true)]).unwrap_err();
        assert!(
            e.starts_with("line 2:") && e.contains("unterminated #if"),
            "{e}"
        );
        let e = preprocess("a\n#endif", &[]).unwrap_err();
        assert!(
            e.starts_with("line 2:") && e.contains("#endif without #if"),
            "{e}"
        );
        let e = preprocess("#else", &[]).unwrap_err();
        assert!(
            e.starts_with("line 1:") && e.contains("#else without #if"),
            "{e}"
        );
        let e = preprocess("#if A\n#else\n#else\n#endif", &[b("A", true)]).unwrap_err();
        assert!(
            e.starts_with("line 3:") && e.contains("second #else"),
            "{e}"
        );
        let e = preprocess("\n#ifdef A\n#endif", &[b("A", true)]).unwrap_err();
        assert!(
            e.starts_with("line 2:") && e.contains("unknown preprocessor directive"),
            "{e}"
        );
    }

    #[test]
    fn include_appends_the_common_file_after_the_kernel() {
        let src = "a\n#include \"sort_key.wgsl\"\nb";
        let out = preprocess(src, &[]).unwrap();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(&lines[..3], ["a", "", "b"]);
        assert!(out.contains("fn sort_key(x: f32) -> u32"));
        let (_, text) = COMMON.iter().find(|(f, _)| *f == "sort_key.wgsl").unwrap();
        assert!(out.ends_with(text), "included text is appended verbatim");
    }

    #[test]
    fn include_in_inactive_branch_is_skipped() {
        let src = "#if A\n#include \"scan.wgsl\"\n#endif";
        assert!(!preprocess(src, &[b("A", false)])
            .unwrap()
            .contains("scan_256"));
        assert!(preprocess(src, &[b("A", true)])
            .unwrap()
            .contains("scan_256"));
        // An unknown file in an inactive branch is not looked up.
        assert!(preprocess("#if A\n#include \"nope.wgsl\"\n#endif", &[b("A", false)]).is_ok());
    }

    #[test]
    fn include_of_unknown_file_or_bad_syntax_is_an_error() {
        let e = preprocess("x\n#include \"nope.wgsl\"", &[]).unwrap_err();
        assert!(
            e.starts_with("line 2:") && e.contains("no such file"),
            "{e}"
        );
        assert!(e.contains("scan.wgsl"), "lists the known files: {e}");
        let e = preprocess("#include scan.wgsl", &[]).unwrap_err();
        assert!(e.contains("expected #include \"name.wgsl\""), "{e}");
        let e = preprocess("#include \"../scan.wgsl\"", &[]).unwrap_err();
        assert!(e.contains("no such file"), "{e}");
    }

    #[test]
    fn duplicate_include_adds_the_file_once() {
        let src = "#include \"sort_key.wgsl\"\n#include \"sort_key.wgsl\"\n";
        let out = preprocess(src, &[]).unwrap();
        assert_eq!(out.matches("fn sort_key(").count(), 1, "{out}");
    }

    /// A library whose files include each other: a → b → a (a cycle), self.wgsl → itself, and a
    /// diamond top → (left, right) → base.
    const LIB: &[(&str, &str)] = &[
        ("a.wgsl", "fn a() {}\n#include \"b.wgsl\""),
        ("b.wgsl", "fn b() {}\n\n#include \"a.wgsl\""),
        ("self.wgsl", "#include \"self.wgsl\""),
        (
            "top.wgsl",
            "#include \"left.wgsl\"\n#include \"right.wgsl\"",
        ),
        ("left.wgsl", "#include \"base.wgsl\"\nfn left() {}"),
        ("right.wgsl", "#include \"base.wgsl\"\nfn right() {}"),
        ("base.wgsl", "fn base() {}"),
        ("bad.wgsl", "fn bad() {}\n#if MISSING\n#endif"),
        ("uses_bad.wgsl", "\n\n#include \"bad.wgsl\""),
    ];

    #[test]
    fn include_cycle_is_an_error_naming_the_chain() {
        let e = preprocess_with("x\n#include \"a.wgsl\"", &[], LIB).unwrap_err();
        assert!(
            e.contains("include cycle a.wgsl -> b.wgsl -> a.wgsl"),
            "{e}"
        );
        assert!(
            e.starts_with(
                "line 3 of common/b.wgsl (included from line 2 of common/a.wgsl, from line 2)"
            ),
            "{e}"
        );
        let e = preprocess_with("#include \"self.wgsl\"", &[], LIB).unwrap_err();
        assert!(e.contains("include cycle self.wgsl -> self.wgsl"), "{e}");
    }

    #[test]
    fn diamond_includes_add_the_shared_file_once() {
        let out =
            preprocess_with("#include \"top.wgsl\"\n#include \"base.wgsl\"", &[], LIB).unwrap();
        assert_eq!(out.matches("fn base()").count(), 1, "{out}");
        assert_eq!(out.matches("fn left()").count(), 1, "{out}");
        assert_eq!(out.matches("fn right()").count(), 1, "{out}");
    }

    #[test]
    fn errors_inside_included_files_name_the_file_and_the_include_lines() {
        let e = preprocess_with("a\nb\n#include \"uses_bad.wgsl\"", &[], LIB).unwrap_err();
        assert_eq!(
            e,
            "line 2 of common/bad.wgsl (included from line 3 of common/uses_bad.wgsl, from \
             line 3): #if MISSING: const MISSING not given for this variant"
        );
    }

    #[test]
    fn common_list_matches_the_folder() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("shaders/common");
        let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".wgsl"))
            .collect();
        on_disk.sort();
        let mut listed: Vec<String> = COMMON.iter().map(|(f, _)| f.to_string()).collect();
        listed.sort();
        assert_eq!(
            listed, on_disk,
            "wgsl::COMMON must list every file in shaders/common/"
        );
        for (f, text) in COMMON {
            let disk = std::fs::read_to_string(dir.join(f)).unwrap();
            assert_eq!(*text, disk, "{f}");
        }
    }

    #[test]
    fn compose_prepends_the_const_header() {
        let consts = [
            ("A", ConstVal::Bool(true)),
            ("N", ConstVal::U32(7)),
            ("S", ConstVal::I32(-2)),
            ("T", ConstVal::F32(0.05)),
        ];
        let out = compose("#if A\nx\n#endif", &consts).unwrap();
        assert_eq!(
            out,
            "const A: bool = true;\nconst N: u32 = 7u;\nconst S: i32 = -2i;\nconst T: f32 = 0.05f;\n\nx\n\n"
        );
    }
}
