//! Pretty-printing the daemon's JSON without reordering it.
//!
//! `serde_json::Value` (without the `preserve_order` feature) sorts object keys, so `--json`
//! output is re-indented from the frame's own text instead: the daemon's field order survives.

/// The raw text of the value under `key` in a top-level JSON object.
pub fn top_level_value<'a>(json: &'a str, key: &str) -> Option<&'a str> {
    let b = json.as_bytes();
    let mut i = skip_ws(b, 0);
    if b.get(i) != Some(&b'{') {
        return None;
    }
    i += 1;
    loop {
        i = skip_ws(b, i);
        if b.get(i) != Some(&b'"') {
            return None;
        }
        let key_end = skip_string(b, i)?;
        let this_key = &json[i + 1..key_end - 1];
        i = skip_ws(b, key_end);
        if b.get(i) != Some(&b':') {
            return None;
        }
        let start = skip_ws(b, i + 1);
        let end = skip_value(b, start)?;
        if this_key == key {
            return Some(&json[start..end]);
        }
        i = skip_ws(b, end);
        match b.get(i) {
            Some(b',') => i += 1,
            _ => return None,
        }
    }
}

fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while b.get(i).is_some_and(|c| c.is_ascii_whitespace()) {
        i += 1;
    }
    i
}

/// `i` is at an opening quote; returns the index just past the closing one.
fn skip_string(b: &[u8], mut i: usize) -> Option<usize> {
    i += 1;
    loop {
        match b.get(i)? {
            b'\\' => i += 2,
            b'"' => return Some(i + 1),
            _ => i += 1,
        }
    }
}

fn skip_value(b: &[u8], i: usize) -> Option<usize> {
    match b.get(i)? {
        b'"' => skip_string(b, i),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut j = i;
            loop {
                match b.get(j)? {
                    b'"' => {
                        j = skip_string(b, j)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(j + 1);
                        }
                    }
                    _ => {}
                }
                j += 1;
            }
        }
        _ => {
            let mut j = i;
            while b
                .get(j)
                .is_some_and(|c| !matches!(c, b',' | b'}' | b']') && !c.is_ascii_whitespace())
            {
                j += 1;
            }
            (j > i).then_some(j)
        }
    }
}

/// Re-indents valid JSON text the way `serde_json::to_string_pretty` would, keeping key order.
pub fn pretty(json: &str) -> String {
    let mut out = String::with_capacity(json.len() * 2);
    let mut depth = 0usize;
    let mut chars = json.chars().peekable();
    let newline = |out: &mut String, depth: usize| {
        out.push('\n');
        out.extend(std::iter::repeat_n("  ", depth));
    };
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                out.push('"');
                while let Some(s) = chars.next() {
                    out.push(s);
                    match s {
                        '\\' => out.extend(chars.next()),
                        '"' => break,
                        _ => {}
                    }
                }
            }
            '{' | '[' => {
                let close = if c == '{' { '}' } else { ']' };
                while chars.peek().is_some_and(|n| n.is_whitespace()) {
                    chars.next();
                }
                if chars.peek() == Some(&close) {
                    chars.next();
                    out.push(c);
                    out.push(close);
                } else {
                    out.push(c);
                    depth += 1;
                    newline(&mut out, depth);
                }
            }
            '}' | ']' => {
                depth = depth.saturating_sub(1);
                newline(&mut out, depth);
                out.push(c);
            }
            ',' => {
                out.push(',');
                newline(&mut out, depth);
            }
            ':' => out.push_str(": "),
            c if c.is_whitespace() => {}
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_serde_json_pretty() {
        // Sorted keys, so serde_json's (sorted) order and the text's order agree.
        let v = serde_json::json!({
            "a": [1, 2.5, {"b": null, "c": "x, \"y\": {z}"}],
            "d": {},
            "e": [],
            "f": {"g": true, "h": "caf\u{e9} \\ end"}
        });
        let compact = serde_json::to_string(&v).unwrap();
        assert_eq!(pretty(&compact), serde_json::to_string_pretty(&v).unwrap());
        assert_eq!(pretty("  { \"a\" : 1 }  "), "{\n  \"a\": 1\n}");
    }

    #[test]
    fn extracts_values_and_keeps_order() {
        let line = r#"{"type":"result","op_id":"op-1","result":{"zeta":1,"alpha":{"s":"}"}}}"#;
        let raw = top_level_value(line, "result").unwrap();
        assert_eq!(raw, r#"{"zeta":1,"alpha":{"s":"}"}}"#);
        assert_eq!(
            pretty(raw),
            "{\n  \"zeta\": 1,\n  \"alpha\": {\n    \"s\": \"}\"\n  }\n}"
        );
        assert_eq!(top_level_value(line, "op_id"), Some("\"op-1\""));
        assert_eq!(
            top_level_value(r#"{"result":false}"#, "result"),
            Some("false")
        );
        assert_eq!(top_level_value(line, "missing"), None);
        assert_eq!(top_level_value("[1]", "result"), None);
    }
}
