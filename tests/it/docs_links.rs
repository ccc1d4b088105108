//! The documentation's links and design citations resolve (issue 10, item 7).
//!
//! Every relative link in `README.md` and `docs/**/*.md` names a file or directory
//! that exists, and a `#anchor` names a heading of the target page as GitHub
//! renders it. Every "DESIGN §n" / "DESIGN n.n" citation in the code (`src/`,
//! `tools/`), the migrations, the scripts and the docs names a section of
//! `docs/design.md`.
//! Plain file reading: no token, no network.

use std::collections::{BTreeSet, HashMap};
use std::path::{Component, Path, PathBuf};

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// `README.md` and every `.md` file under `docs/`, sorted.
fn markdown_files() -> Vec<PathBuf> {
    let mut files = vec![repo().join("README.md")];
    walk(&repo().join("docs"), &mut |path| {
        if path.extension().is_some_and(|e| e == "md") {
            files.push(path.to_owned());
        }
    });
    files.sort();
    files
}

fn walk(dir: &Path, found: &mut dyn FnMut(&Path)) {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            walk(&path, found);
        } else {
            found(&path);
        }
    }
}

/// The lines of a Markdown file outside fenced code blocks, with their numbers.
fn prose_lines(text: &str) -> Vec<(usize, &str)> {
    let mut fence: Option<&str> = None;
    let mut lines = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let trimmed = line.trim_start();
        let marker = ["```", "~~~"].into_iter().find(|m| trimmed.starts_with(m));
        match (fence, marker) {
            (None, Some(m)) => fence = Some(m),
            (Some(open), Some(m)) if open == m => fence = None,
            (None, None) => lines.push((i + 1, line)),
            _ => {}
        }
    }
    lines
}

/// A line with its inline code spans (`` `...` ``) removed.
fn without_code_spans(line: &str) -> String {
    let mut out = String::new();
    let mut rest = line;
    while let Some(start) = rest.find('`') {
        out.push_str(&rest[..start]);
        let ticks = rest[start..].chars().take_while(|&c| c == '`').count();
        let after = &rest[start + ticks..];
        match after.find(&"`".repeat(ticks)) {
            Some(end) => rest = &after[end + ticks..],
            None => {
                // An unclosed backtick is literal text.
                out.push_str(&rest[start..start + ticks]);
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// The targets of the inline links and images (`[text](target)`) and of the
/// reference definitions (`[name]: target`) of a Markdown file, with line numbers.
fn link_targets(text: &str) -> Vec<(usize, String)> {
    let mut targets = Vec::new();
    for (number, line) in prose_lines(text) {
        let line = without_code_spans(line);
        let mut rest = line.as_str();
        while let Some(at) = rest.find("](") {
            let after = &rest[at + 2..];
            let end = after.find(')').unwrap_or_else(|| {
                panic!("line {number}: a link target is not closed on its line: {line}")
            });
            // `[text](target "title")`: the target is the first word, or
            // everything between `<` and `>`.
            let inside = &after[..end];
            let target = match inside.strip_prefix('<') {
                Some(bracketed) => bracketed.split('>').next().unwrap_or(""),
                None => inside.split_whitespace().next().unwrap_or(""),
            };
            targets.push((number, target.to_owned()));
            rest = &after[end..];
        }
        let trimmed = line.trim_start();
        if let Some(definition) = trimmed.strip_prefix('[')
            && let Some((_, target)) = definition.split_once("]: ")
        {
            targets.push((
                number,
                target.split_whitespace().next().unwrap_or("").into(),
            ));
        }
    }
    targets
}

/// GitHub's anchor for a heading: lower case, spaces to hyphens, and every
/// character that is not a letter, a digit, `-` or `_` dropped (markup included).
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            '-' | '_' => Some(c),
            c if c.is_alphanumeric() => Some(c),
            _ => None,
        })
        .collect()
}

/// The anchors of a Markdown file's ATX headings, a repeated one suffixed `-1`,
/// `-2`, ... as GitHub does.
fn anchors(text: &str) -> BTreeSet<String> {
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut anchors = BTreeSet::new();
    for (_, line) in prose_lines(text) {
        let hashes = line.chars().take_while(|&c| c == '#').count();
        if !(1..=6).contains(&hashes) || !line[hashes..].starts_with(' ') {
            continue;
        }
        let heading = line[hashes..].trim().trim_end_matches('#');
        let base = slug(heading);
        let count = seen.entry(base.clone()).or_insert(0);
        let anchor = if *count == 0 {
            base.clone()
        } else {
            format!("{base}-{count}")
        };
        *count += 1;
        anchors.insert(anchor);
    }
    anchors
}

/// `a/b/../c` without touching the file system, so a missing file is reported as such.
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for part in path.components() {
        match part {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

fn is_external(target: &str) -> bool {
    // A scheme (`https:`, `mailto:`) before any `/`, `#` or `.`.
    target
        .find(':')
        .is_some_and(|colon| !target[..colon].contains(['/', '#', '.']))
        || target.starts_with("//")
}

#[test]
fn every_relative_link_in_the_docs_resolves() {
    let files = markdown_files();
    assert!(files.len() > 5, "the docs are found: {files:?}");
    let mut broken = Vec::new();
    let mut checked = 0;
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        let shown = file.strip_prefix(repo()).unwrap().display().to_string();
        for (line, target) in link_targets(&text) {
            if target.is_empty() {
                broken.push(format!("{shown}:{line}: an empty link target"));
                continue;
            }
            if is_external(&target) {
                continue;
            }
            checked += 1;
            let (path, anchor) = match target.split_once('#') {
                Some((path, anchor)) => (path, Some(anchor)),
                None => (target.as_str(), None),
            };
            if path.starts_with('/') {
                broken.push(format!(
                    "{shown}:{line}: {target}: links are relative to the page, not the site root"
                ));
                continue;
            }
            let resolved = if path.is_empty() {
                file.clone()
            } else {
                normalize(&file.parent().unwrap().join(path))
            };
            if !resolved.exists() {
                broken.push(format!("{shown}:{line}: {target}: no such file"));
                continue;
            }
            let Some(anchor) = anchor else { continue };
            if resolved.extension().is_none_or(|e| e != "md") {
                broken.push(format!(
                    "{shown}:{line}: {target}: an anchor into a file that is not Markdown"
                ));
                continue;
            }
            let headings = anchors(&std::fs::read_to_string(&resolved).unwrap());
            if !headings.contains(anchor) {
                broken.push(format!(
                    "{shown}:{line}: {target}: no heading with anchor #{anchor} in {}",
                    resolved.strip_prefix(repo()).unwrap_or(&resolved).display()
                ));
            }
        }
    }
    assert!(checked > 20, "relative links are found: {checked}");
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

/// The section numbers of `docs/design.md`: its numbered headings (`## 2.`,
/// `### 2.1`), and `7.n` for the n-th invariant of section 7.
fn design_sections() -> BTreeSet<String> {
    let text = std::fs::read_to_string(repo().join("docs/design.md")).unwrap();
    let mut sections = BTreeSet::new();
    let mut current = String::new();
    for (_, line) in prose_lines(&text) {
        if let Some(heading) = line
            .strip_prefix("## ")
            .or_else(|| line.strip_prefix("### "))
        {
            let number: String = heading
                .chars()
                .take_while(|c| c.is_ascii_digit() || *c == '.')
                .collect();
            let number = number.trim_end_matches('.').to_owned();
            if !number.is_empty() {
                sections.insert(number.clone());
                current = number;
            }
        } else if current == "7" {
            let item: String = line.chars().take_while(char::is_ascii_digit).collect();
            if !item.is_empty() && line[item.len()..].starts_with(". ") {
                sections.insert(format!("7.{item}"));
            }
        }
    }
    sections
}

/// A section number at the start of `text` (`2`, `2.4`, `7.6`), and the rest.
fn section_number(text: &str) -> Option<(String, &str)> {
    let mut end = 0;
    let bytes = text.as_bytes();
    while end < bytes.len()
        && (bytes[end].is_ascii_digit()
            || (bytes[end] == b'.'
                && end > 0
                && bytes.get(end + 1).is_some_and(u8::is_ascii_digit)))
    {
        end += 1;
    }
    (end > 0).then(|| (text[..end].to_owned(), &text[end..]))
}

/// The section numbers a text cites: `DESIGN 2.4`, `DESIGN §7.6`, `DESIGN §4–5`
/// (both ends), `DESIGN 2.4, 4` (each).
fn citations(text: &str) -> Vec<(usize, String)> {
    let mut cited = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let mut rest = line;
        while let Some(at) = rest.find("DESIGN") {
            rest = &rest[at + "DESIGN".len()..];
            let mut tail = rest.trim_start_matches(' ').trim_start_matches('§');
            while let Some((number, after)) = section_number(tail) {
                cited.push((i + 1, number));
                tail = match after
                    .strip_prefix('–')
                    .or_else(|| after.strip_prefix('-'))
                    .or_else(|| after.strip_prefix(", "))
                    .or_else(|| after.strip_prefix(" and §"))
                {
                    Some(next) => next.trim_start_matches('§'),
                    None => break,
                };
            }
        }
    }
    cited
}

#[test]
fn every_design_citation_names_a_section_of_docs_design_md() {
    let sections = design_sections();
    for expected in [
        "1", "2", "2.1", "2.5", "3", "4", "5", "6", "7", "7.1", "7.6",
    ] {
        assert!(sections.contains(expected), "{expected} in {sections:?}");
    }
    let mut files = Vec::new();
    for dir in [
        "src",
        "tools",
        "tests",
        "migrations",
        "docs",
        "scripts",
        "hsm-config",
        ".ci",
    ] {
        walk(&repo().join(dir), &mut |path| files.push(path.to_owned()));
    }
    files.extend(["README.md", "softhsm-setup.sh"].map(|f| repo().join(f)));
    let mut unknown = Vec::new();
    let mut count = 0;
    for file in files {
        let Ok(text) = std::fs::read_to_string(&file) else {
            continue; // not text
        };
        let shown = file.strip_prefix(repo()).unwrap().display().to_string();
        for (line, number) in citations(&text) {
            count += 1;
            if !sections.contains(&number) {
                unknown.push(format!("{shown}:{line}: DESIGN {number}"));
            }
        }
    }
    assert!(count > 50, "citations are found: {count}");
    assert!(
        unknown.is_empty(),
        "citations of sections docs/design.md does not have:\n{}",
        unknown.join("\n")
    );
}

#[test]
fn the_slugs_and_parsers_behave_like_github() {
    assert_eq!(
        slug("`[[programmes]]` (one table per card programme, at least one)"),
        "programmes-one-table-per-card-programme-at-least-one"
    );
    assert_eq!(
        slug("2.1 CVV, CVV2, iCVV (Visa CVV algorithm; Mastercard CVC uses the same)"),
        "21-cvv-cvv2-icvv-visa-cvv-algorithm-mastercard-cvc-uses-the-same"
    );
    assert_eq!(
        slug("dcvv-gateway — product design"),
        "dcvv-gateway--product-design"
    );
    assert_eq!(
        slug("The attribute policy and `hsm check`"),
        "the-attribute-policy-and-hsm-check"
    );
    let page = "# A\n## B\n```\n# not a heading\n```\n## B\n";
    assert_eq!(
        anchors(page),
        ["a", "b", "b-1"].map(String::from).into_iter().collect()
    );
    assert_eq!(
        link_targets("[x](a.md#b) `[y](code.md)` [z](<c d.md> \"t\")\n```\n[w](fenced.md)\n```\n"),
        vec![(1, "a.md#b".to_owned()), (1, "c d.md".to_owned())]
    );
    assert!(is_external("https://rustup.rs") && is_external("mailto:x@example.com"));
    assert!(!is_external("docs/api.md#errors") && !is_external("#fail-closed"));
    let cited: Vec<String> =
        citations("DESIGN §4–5, DESIGN 2.4, 4 and DESIGN §7.6. DESIGN.md DESIGN §n")
            .into_iter()
            .map(|(_, n)| n)
            .collect();
    assert_eq!(cited, ["4", "5", "2.4", "4", "7.6"]);
}
