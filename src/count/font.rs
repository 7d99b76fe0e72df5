//! A small bitmap font for the annotated images, so that marrow needs no font file and no text
//! rendering crate.
//!
//! Each glyph is 5 pixels wide and 9 rows tall: rows 0–6 hold capitals and digits (cap height 7,
//! baseline under row 6), lower case has an x-height of 5 (rows 2–6), and rows 7–8 hold
//! descenders (g, j, p, q, y, comma). Glyphs are drawn at an integer `scale`; the advance is
//! 6 × scale (one column of spacing). A character without a glyph is drawn as a hollow box.

/// Glyph width in font pixels.
pub const WIDTH: u32 = 5;
/// Glyph height in font pixels, descenders included.
pub const HEIGHT: u32 = 9;
/// Capital height in font pixels (rows above the baseline).
pub const CAP_HEIGHT: u32 = 7;
/// Horizontal advance per character in font pixels.
pub const ADVANCE: u32 = WIDTH + 1;

/// Parses a glyph written as 9 space-separated rows of 5 characters, `#` for ink (rows left out
/// at the end are blank). Bit 4 of a row is its leftmost pixel.
const fn g(c: char, rows: &str) -> (char, [u8; 9]) {
    let b = rows.as_bytes();
    let mut out = [0u8; 9];
    let (mut i, mut row, mut col) = (0, 0, 0);
    while i < b.len() {
        match b[i] {
            b' ' => {
                row += 1;
                col = 0;
            }
            ch => {
                if ch == b'#' {
                    out[row] |= 1 << (4 - col);
                }
                col += 1;
            }
        }
        i += 1;
    }
    (c, out)
}

/// Drawn for characters the font lacks.
const MISSING: [u8; 9] = g('?', "##### #...# #...# #...# #...# #...# #####").1;

const GLYPHS: &[(char, [u8; 9])] = &[
    g(' ', ""),
    g('A', ".###. #...# #...# ##### #...# #...# #...#"),
    g('B', "####. #...# #...# ####. #...# #...# ####."),
    g('C', ".###. #...# #.... #.... #.... #...# .###."),
    g('D', "####. #...# #...# #...# #...# #...# ####."),
    g('E', "##### #.... #.... ####. #.... #.... #####"),
    g('F', "##### #.... #.... ####. #.... #.... #...."),
    g('G', ".###. #...# #.... #.### #...# #...# .####"),
    g('H', "#...# #...# #...# ##### #...# #...# #...#"),
    g('I', ".###. ..#.. ..#.. ..#.. ..#.. ..#.. .###."),
    g('J', "..### ...#. ...#. ...#. ...#. #..#. .##.."),
    g('K', "#...# #..#. #.#.. ##... #.#.. #..#. #...#"),
    g('L', "#.... #.... #.... #.... #.... #.... #####"),
    g('M', "#...# ##.## #.#.# #.#.# #...# #...# #...#"),
    g('N', "#...# #...# ##..# #.#.# #..## #...# #...#"),
    g('O', ".###. #...# #...# #...# #...# #...# .###."),
    g('P', "####. #...# #...# ####. #.... #.... #...."),
    g('Q', ".###. #...# #...# #...# #.#.# #..#. .##.#"),
    g('R', "####. #...# #...# ####. #.#.. #..#. #...#"),
    g('S', ".#### #.... #.... .###. ....# ....# ####."),
    g('T', "##### ..#.. ..#.. ..#.. ..#.. ..#.. ..#.."),
    g('U', "#...# #...# #...# #...# #...# #...# .###."),
    g('V', "#...# #...# #...# #...# #...# .#.#. ..#.."),
    g('W', "#...# #...# #...# #.#.# #.#.# #.#.# .#.#."),
    g('X', "#...# #...# .#.#. ..#.. .#.#. #...# #...#"),
    g('Y', "#...# #...# .#.#. ..#.. ..#.. ..#.. ..#.."),
    g('Z', "##### ....# ...#. ..#.. .#... #.... #####"),
    g('a', "..... ..... .###. ....# .#### #...# .####"),
    g('b', "#.... #.... #.##. ##..# #...# #...# ####."),
    g('c', "..... ..... .###. #.... #.... #...# .###."),
    g('d', "....# ....# .##.# #..## #...# #...# .####"),
    g('e', "..... ..... .###. #...# ##### #.... .###."),
    g('f', "..##. .#..# .#... ###.. .#... .#... .#..."),
    g('g', "..... ..... .#### #...# #...# #..## .##.# ....# .###."),
    g('h', "#.... #.... #.##. ##..# #...# #...# #...#"),
    g('i', "..#.. ..... .##.. ..#.. ..#.. ..#.. .###."),
    g('j', "...#. ..... ..##. ...#. ...#. ...#. ...#. #..#. .##.."),
    g('k', "#.... #.... #..#. #.#.. ##... #.#.. #..#."),
    g('l', ".##.. ..#.. ..#.. ..#.. ..#.. ..#.. .###."),
    g('m', "..... ..... ##.#. #.#.# #.#.# #.#.# #.#.#"),
    g('n', "..... ..... #.##. ##..# #...# #...# #...#"),
    g('o', "..... ..... .###. #...# #...# #...# .###."),
    g('p', "..... ..... #.##. ##..# #...# ##..# #.##. #.... #...."),
    g('q', "..... ..... .##.# #..## #...# #..## .##.# ....# ....#"),
    g('r', "..... ..... #.##. ##..# #.... #.... #...."),
    g('s', "..... ..... .###. #.... .###. ....# ####."),
    g('t', ".#... .#... ###.. .#... .#... .#..# ..##."),
    g('u', "..... ..... #...# #...# #...# #..## .##.#"),
    g('v', "..... ..... #...# #...# #...# .#.#. ..#.."),
    g('w', "..... ..... #...# #...# #.#.# #.#.# .#.#."),
    g('x', "..... ..... #...# .#.#. ..#.. .#.#. #...#"),
    g('y', "..... ..... #...# #...# #...# #..## .##.# ....# .###."),
    g('z', "..... ..... ##### ...#. ..#.. .#... #####"),
    g('0', ".###. #...# #..## #.#.# ##..# #...# .###."),
    g('1', "..#.. .##.. ..#.. ..#.. ..#.. ..#.. .###."),
    g('2', ".###. #...# ....# ...#. ..#.. .#... #####"),
    g('3', "##### ...#. ..#.. ...#. ....# #...# .###."),
    g('4', "...#. ..##. .#.#. #..#. ##### ...#. ...#."),
    g('5', "##### #.... ####. ....# ....# #...# .###."),
    g('6', "..##. .#... #.... ####. #...# #...# .###."),
    g('7', "##### ....# ...#. ..#.. .#... .#... .#..."),
    g('8', ".###. #...# #...# .###. #...# #...# .###."),
    g('9', ".###. #...# #...# .#### ....# ...#. .##.."),
    g('.', "..... ..... ..... ..... ..... .##.. .##.."),
    g(',', "..... ..... ..... ..... ..... .##.. .##.. ..#.. .#..."),
    g(':', "..... .##.. .##.. ..... .##.. .##.. ....."),
    g(';', "..... .##.. .##.. ..... .##.. .##.. ..#.. .#..."),
    g('%', "##... ##..# ...#. ..#.. .#... #..## ...##"),
    g('(', "...#. ..#.. .#... .#... .#... ..#.. ...#."),
    g(')', ".#... ..#.. ...#. ...#. ...#. ..#.. .#..."),
    g('[', ".###. .#... .#... .#... .#... .#... .###."),
    g(']', ".###. ...#. ...#. ...#. ...#. ...#. .###."),
    g('=', "..... ..... ##### ..... ##### ..... ....."),
    g('-', "..... ..... ..... ##### ..... ..... ....."),
    g('+', "..... ..#.. ..#.. ##### ..#.. ..#.. ....."),
    g('/', "..... ....# ...#. ..#.. .#... #.... ....."),
    g('_', "..... ..... ..... ..... ..... ..... ..... #####"),
    g('<', "...#. ..#.. .#... #.... .#... ..#.. ...#."),
    g('>', ".#... ..#.. ...#. ....# ...#. ..#.. .#..."),
    g('≥', ".#... ..#.. ...#. ..#.. .#... ..... #####"),
    g('≤', "...#. ..#.. .#... ..#.. ...#. ..... #####"),
    g('\'', "..#.. ..#.. .#... ..... ..... ..... ....."),
    g('"', ".#.#. .#.#. .#.#. ..... ..... ..... ....."),
    g('?', ".###. #...# ....# ...#. ..#.. ..... ..#.."),
    g('!', "..#.. ..#.. ..#.. ..#.. ..#.. ..... ..#.."),
    g('#', ".#.#. .#.#. ##### .#.#. ##### .#.#. .#.#."),
    g('*', "..... ..#.. #.#.# .###. #.#.# ..#.. ....."),
    g('×', "..... #...# .#.#. ..#.. .#.#. #...# ....."),
    g('µ', "..... ..... #...# #...# #...# #..## ###.# #.... #...."),
];

/// The 9 rows of `c`'s glyph (bit 4 = leftmost pixel); a hollow box for characters the font
/// lacks.
pub fn glyph(c: char) -> [u8; 9] {
    GLYPHS
        .iter()
        .find(|(k, _)| *k == c)
        .map(|(_, rows)| *rows)
        .unwrap_or(MISSING)
}

/// Whether the font has a glyph of its own for `c`.
pub fn has_glyph(c: char) -> bool {
    GLYPHS.iter().any(|(k, _)| *k == c)
}

/// Width in pixels of `text` drawn at `scale` (no trailing spacing column).
pub fn text_width(text: &str, scale: u32) -> u32 {
    let n = text.chars().count() as u32;
    if n == 0 {
        0
    } else {
        (n * ADVANCE - 1) * scale
    }
}

/// Calls `ink(x, y)` for every font pixel of `text` with its top-left corner at (`x`, `y`),
/// each font pixel a `scale`×`scale` square. Coordinates may lie outside any image: clipping is
/// the caller's.
pub fn render(text: &str, x: i64, y: i64, scale: u32, mut ink: impl FnMut(i64, i64)) {
    let s = scale.max(1) as i64;
    for (i, c) in text.chars().enumerate() {
        let rows = glyph(c);
        let x0 = x + i as i64 * ADVANCE as i64 * s;
        for (r, bits) in rows.iter().enumerate() {
            for col in 0..WIDTH as i64 {
                if bits & (1 << (4 - col)) != 0 {
                    for dy in 0..s {
                        for dx in 0..s {
                            ink(x0 + col * s + dx, y + r as i64 * s + dy);
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn required_characters_have_glyphs() {
        for c in ('A'..='Z').chain('a'..='z').chain('0'..='9') {
            assert!(has_glyph(c), "{c:?} has no glyph");
        }
        for c in ".:%()=-/_ ≥<>".chars() {
            assert!(has_glyph(c), "{c:?} has no glyph");
        }
        // Every glyph but the space has ink, and no two visible glyphs are identical.
        for (c, rows) in GLYPHS {
            assert_eq!(*c == ' ', rows.iter().all(|r| *r == 0), "{c:?}");
            let same: Vec<char> = GLYPHS
                .iter()
                .filter(|(k, r)| k != c && r == rows)
                .map(|(k, _)| *k)
                .collect();
            assert!(same.is_empty(), "{c:?} looks like {same:?}");
        }
    }

    #[test]
    fn render_scales_and_measures() {
        let mut n1 = 0;
        render("H", 0, 0, 1, |_, _| n1 += 1);
        let mut n3 = 0;
        let mut max = (0, 0);
        render("H", 10, 20, 3, |x, y| {
            n3 += 1;
            max = (max.0.max(x), max.1.max(y));
        });
        assert_eq!(n3, 9 * n1);
        assert_eq!(max, (10 + 15 - 1, 20 + 21 - 1));
        assert_eq!(text_width("", 2), 0);
        assert_eq!(text_width("ab", 2), 22);
        assert_eq!(glyph('€'), MISSING);
    }
}
