//! kubectl-like tables: columns padded to their widest cell, three spaces
//! apart. A table can be printed page by page as a list arrives, so the
//! first rows appear before the last page is fetched: the widths come from
//! the first page and grow when a later cell is wider.

use std::io::Write;

/// A table printed in pages.
pub struct Table {
    header: Vec<String>,
    widths: Vec<usize>,
    indent: usize,
    header_printed: bool,
}

impl Table {
    pub fn new(header: &[&str]) -> Table {
        Table {
            header: header.iter().map(|h| h.to_string()).collect(),
            widths: header.iter().map(|h| h.chars().count()).collect(),
            indent: 0,
            header_printed: false,
        }
    }

    /// Indents every line by two spaces (tables inside `describe`).
    pub fn indented(mut self) -> Table {
        self.indent = 2;
        self
    }

    /// Prints one page of rows (the header before the first).
    pub fn page(&mut self, rows: &[Vec<String>]) {
        for r in rows {
            for (i, c) in r.iter().enumerate() {
                let w = c.chars().count();
                match self.widths.get_mut(i) {
                    Some(x) => *x = (*x).max(w),
                    None => self.widths.push(w),
                }
            }
        }
        let out = std::io::stdout();
        let mut out = std::io::BufWriter::new(out.lock());
        if !self.header_printed {
            self.header_printed = true;
            let header = self.header.clone();
            self.line(&mut out, &header);
        }
        for r in rows {
            self.line(&mut out, r);
        }
        let _ = out.flush();
    }

    /// Prints all rows at once.
    pub fn print(mut self, rows: &[Vec<String>]) {
        self.page(rows);
    }

    /// All rows as text (header first), for views that print it later.
    pub fn render(mut self, rows: &[Vec<String>]) -> String {
        for r in rows {
            for (i, c) in r.iter().enumerate() {
                let w = c.chars().count();
                match self.widths.get_mut(i) {
                    Some(x) => *x = (*x).max(w),
                    None => self.widths.push(w),
                }
            }
        }
        let mut buf = Vec::new();
        let header = self.header.clone();
        self.line(&mut buf, &header);
        for r in rows {
            self.line(&mut buf, r);
        }
        String::from_utf8_lossy(&buf).into_owned()
    }

    fn line(&self, out: &mut impl Write, cells: &[String]) {
        let mut s = " ".repeat(self.indent);
        for (i, c) in cells.iter().enumerate() {
            s.push_str(c);
            if i + 1 < cells.len() {
                let pad = self
                    .widths
                    .get(i)
                    .copied()
                    .unwrap_or(0)
                    .saturating_sub(c.chars().count())
                    + 3;
                s.extend(std::iter::repeat_n(' ', pad));
            }
        }
        let _ = writeln!(out, "{}", s.trim_end());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn widths_come_from_the_cells_and_grow_across_pages() {
        let mut t = Table::new(&["NAME", "STATUS"]);
        let mut buf = Vec::new();
        t.widths = vec![4, 6];
        t.line(&mut buf, &["a".into(), "Ready".into()]);
        assert_eq!(String::from_utf8_lossy(&buf), "a      Ready\n");
        t.page(&[vec!["longer-name".into(), "x".into()]]);
        assert_eq!(t.widths, vec![11, 6]);
    }
}
