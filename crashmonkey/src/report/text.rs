//! Text put into HTML or SVG: every string that did not come from this module's callers'
//! literals goes through [`esc`] (file names, notes, mark names, operations are data, and a
//! `<` in any of them must not become markup).

/// `s` with the five characters HTML and XML give meaning to replaced by references: safe
/// in element content and in quoted attribute values alike.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            // Control characters other than tab and newline are not allowed in XML 1.0.
            c if c.is_control() && c != '\n' && c != '\t' => out.push('\u{fffd}'),
            c => out.push(c),
        }
    }
    out
}

/// `s` cut to at most `max_chars` characters, an ellipsis marking the cut.
pub fn clip(s: &str, max_chars: usize) -> String {
    if s.chars().count() <= max_chars {
        return s.to_string();
    }
    let mut out: String = s.chars().take(max_chars.saturating_sub(1)).collect();
    out.push('…');
    out
}

/// [`clip`] then [`esc`]: the usual way a label goes into a drawing.
pub fn label(s: &str, max_chars: usize) -> String {
    esc(&clip(s, max_chars))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Guards against markup injection: a file or mark name holding markup must come out as
    /// text (the expected strings are the HTML spec's character references).
    #[test]
    fn escapes_markup() {
        assert_eq!(
            esc(r#"<script>alert("x&y")</script>'"#),
            "&lt;script&gt;alert(&quot;x&amp;y&quot;)&lt;/script&gt;&#39;"
        );
        assert_eq!(esc("a\u{1}b"), "a\u{fffd}b");
    }

    #[test]
    fn clips_by_characters() {
        assert_eq!(clip("abcdef", 4), "abc…");
        assert_eq!(clip("abc", 4), "abc");
        assert_eq!(clip("ééééé", 3), "éé…");
        assert_eq!(label("<<<<<", 3), "&lt;&lt;…");
    }
}
