//! A fast path for the JSON records most topics carry: one flat object per
//! record whose fields are integers, strings, booleans, timestamps or null.
//!
//! arrow-json decodes in two passes — it copies every record into a tape
//! (the bytes of every string once more), then builds each column from the
//! tape — and that was ~60 % of a Kafka reader's CPU when ingesting
//! Nexmark bids into a pass-through view. [`FlatJson`] reads each record
//! once, straight into the column builders.
//!
//! It is a fast path, not a second JSON decoder with its own semantics: it
//! accepts only input whose meaning is unambiguous — strictly valid JSON,
//! field names without escapes, no field twice, integers of at most 18
//! digits, timestamps through the very function arrow-json calls — and for
//! anything else (a float in a BIGINT column, a number in a TEXT column, a
//! surrogate escape, a missing NOT NULL field, one malformed record …) it
//! declines the **whole batch**, which then goes to arrow-json exactly as
//! before, error handling included. So a batch it decodes is the batch
//! arrow-json would have produced; `tests` check that against arrow-json
//! over random records. After a declined batch it steps aside for a while,
//! so a topic whose records never fit costs one failed attempt in
//! `RETRY_AFTER` (64) batches.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use datafusion::arrow::array::builder::NullBufferBuilder;
use datafusion::arrow::array::{
    ArrayRef, BooleanBuilder, Int16Builder, Int32Builder, Int64Builder, RecordBatch, StringArray,
};
use datafusion::arrow::buffer::{Buffer, OffsetBuffer, ScalarBuffer};
use datafusion::arrow::compute::kernels::cast_utils::string_to_datetime;
use datafusion::arrow::datatypes::{
    DataType, SchemaRef, TimeUnit, TimestampMicrosecondType, TimestampMillisecondType,
    TimestampNanosecondType, TimestampSecondType,
};

/// Batches handed straight to arrow-json after the fast path declined one.
const RETRY_AFTER: u32 = 64;

/// Deepest nesting of an ignored field's value the fast path walks.
const MAX_DEPTH: usize = 32;

/// What a column holds (the arrow-json decoders this path stands in for).
#[derive(Debug, Clone, Copy)]
enum Kind {
    Int64,
    Int32,
    Int16,
    Bool,
    Utf8,
    Timestamp(TimeUnit),
}

/// Decodes batches of flat JSON objects into `schema`'s columns, or
/// declines (see the module docs).
#[derive(Debug)]
pub struct FlatJson {
    schema: SchemaRef,
    names: Vec<Box<[u8]>>,
    /// Per column, its name followed by the closing quote as one 16-byte
    /// word and the mask of those bytes — for names of up to 15 plain
    /// bytes (see [`FlatJson::key_is`]).
    probes: Vec<Option<(u128, u128)>>,
    kinds: Vec<Kind>,
    nullable: Vec<bool>,
    /// Batches left to hand to arrow-json before trying again.
    skip: AtomicU32,
}

/// A column being built.
enum Col {
    Int64(Int64Builder),
    Int32(Int32Builder),
    Int16(Int16Builder),
    Bool(BooleanBuilder),
    Utf8(Text),
    /// Timestamps as their i64 values; the unit is the column's.
    Timestamp(Int64Builder, TimeUnit),
}

/// The fast path does not take this batch.
struct Decline;

type Step<T> = std::result::Result<T, Decline>;

impl FlatJson {
    /// A fast path for `schema` (the columns arrow-json would decode), or
    /// `None` when a column has a type it does not handle.
    pub fn new(schema: SchemaRef) -> Option<Arc<FlatJson>> {
        if schema.fields().is_empty() || schema.fields().len() > 64 {
            return None;
        }
        // arrow-json fills the first of two same-named columns; the fast
        // path's by-position guess could pick the other (SQL sources
        // reject duplicate names, so this only guards other callers).
        let mut names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
        names.sort_unstable();
        if names.windows(2).any(|w| w[0] == w[1]) {
            return None;
        }
        let mut kinds = Vec::new();
        for f in schema.fields() {
            kinds.push(match f.data_type() {
                DataType::Int64 => Kind::Int64,
                DataType::Int32 => Kind::Int32,
                DataType::Int16 => Kind::Int16,
                DataType::Boolean => Kind::Bool,
                DataType::Utf8 => Kind::Utf8,
                DataType::Timestamp(unit, None) => Kind::Timestamp(*unit),
                _ => return None,
            });
        }
        let probes = schema
            .fields()
            .iter()
            .map(|f| {
                let name = f.name().as_bytes();
                if name.len() > 15 || name.iter().any(|&b| b == b'"' || b == b'\\' || b < 0x20) {
                    return None;
                }
                let mut word = [0u8; 16];
                word[..name.len()].copy_from_slice(name);
                word[name.len()] = b'"';
                let mask = u128::MAX >> (8 * (15 - name.len()));
                Some((u128::from_le_bytes(word), mask))
            })
            .collect();
        Some(Arc::new(FlatJson {
            probes,
            names: schema
                .fields()
                .iter()
                .map(|f| f.name().as_bytes().into())
                .collect(),
            nullable: schema.fields().iter().map(|f| f.is_nullable()).collect(),
            kinds,
            schema,
            skip: AtomicU32::new(0),
        }))
    }

    /// The rows of `payloads` (one JSON object each), or `None` to have
    /// arrow-json decode them.
    pub fn decode(&self, payloads: &[&[u8]]) -> Option<RecordBatch> {
        if payloads.is_empty() {
            return None;
        }
        let skip = self.skip.load(Ordering::Relaxed);
        if skip > 0 {
            self.skip.store(skip - 1, Ordering::Relaxed);
            return None;
        }
        match self.decode_all(payloads) {
            Ok(batch) => Some(batch),
            Err(Decline) => {
                self.skip.store(RETRY_AFTER, Ordering::Relaxed);
                None
            }
        }
    }

    fn decode_all(&self, payloads: &[&[u8]]) -> Step<RecordBatch> {
        let n = payloads.len();
        let bytes: usize = payloads.iter().map(|p| p.len()).sum();
        // A text column's strings are at most the payloads' bytes; past
        // i32 offsets arrow's builder would panic where arrow-json errors.
        if bytes > i32::MAX as usize {
            return Err(Decline);
        }
        let mut cols: Vec<Col> = self
            .kinds
            .iter()
            .map(|k| match k {
                Kind::Int64 => Col::Int64(Int64Builder::with_capacity(n)),
                Kind::Int32 => Col::Int32(Int32Builder::with_capacity(n)),
                Kind::Int16 => Col::Int16(Int16Builder::with_capacity(n)),
                Kind::Bool => Col::Bool(BooleanBuilder::with_capacity(n)),
                // Strings are most of a record's bytes; one guess for all.
                Kind::Utf8 => Col::Utf8(Text::with_capacity(n, bytes / self.kinds.len())),
                Kind::Timestamp(u) => Col::Timestamp(Int64Builder::with_capacity(n), *u),
            })
            .collect();
        let mut scratch = Vec::new();
        for p in payloads {
            self.record(p, &mut cols, &mut scratch)?;
        }
        let arrays = cols.into_iter().map(finish).collect::<Step<Vec<_>>>()?;
        RecordBatch::try_new(self.schema.clone(), arrays).map_err(|_| Decline)
    }

    /// Appends one record's values (one per column) or declines.
    fn record(&self, p: &[u8], cols: &mut [Col], scratch: &mut Vec<u8>) -> Step<()> {
        let mut r = Reader { b: p, i: 0 };
        r.ws();
        r.expect(b'{')?;
        r.ws();
        let mut seen: u64 = 0;
        // The column after the last one is tried first.
        let mut next = 0usize;
        if !r.closes(b'}') {
            loop {
                r.expect(b'"')?;
                // Producers write fields in one order: the expected name
                // is usually next, checked with one 16-byte compare.
                let (col, key) = if let Some(len) = self.key_is(next, &r) {
                    r.i += len + 1;
                    (Some(next), &[][..])
                } else {
                    let key = r.plain_key()?;
                    (self.names.iter().position(|n| **n == *key), key)
                };
                r.ws();
                r.expect(b':')?;
                r.ws();
                match col {
                    Some(c) => {
                        if seen & (1 << c) != 0 {
                            return Err(Decline);
                        }
                        seen |= 1 << c;
                        self.value(&mut r, c, &mut cols[c], scratch)?;
                        next = c + 1;
                    }
                    None => {
                        // A column's name is text; any other key must be.
                        utf8(key)?;
                        r.skip_value(0, scratch)?
                    }
                }
                if r.next_or_close(b'}')? {
                    break;
                }
            }
        }
        r.ws();
        if r.i != p.len() {
            return Err(Decline);
        }
        // Fields the record did not have are NULL (declined where the
        // column is NOT NULL: arrow-json reports that).
        for (c, col) in cols.iter_mut().enumerate() {
            if seen & (1 << c) == 0 {
                if !self.nullable[c] {
                    return Err(Decline);
                }
                append_null(col);
            }
        }
        Ok(())
    }

    /// Whether the bytes at the reader (just after a key's opening quote)
    /// are column `c`'s name and the closing quote; returns the name's
    /// length. The name has no quote, backslash or control byte, so this
    /// is exactly what [`Reader::plain_key`] would read. `None` also when
    /// fewer than 16 bytes are left or the name is long: the caller takes
    /// the general path.
    fn key_is(&self, c: usize, r: &Reader<'_>) -> Option<usize> {
        let (word, mask) = (*self.probes.get(c)?)?;
        let bytes: [u8; 16] = r.b.get(r.i..r.i + 16)?.try_into().ok()?;
        (u128::from_le_bytes(bytes) & mask == word).then(|| self.names[c].len())
    }

    /// Reads the value of column `c` into its builder.
    fn value(
        &self,
        r: &mut Reader<'_>,
        c: usize,
        col: &mut Col,
        scratch: &mut Vec<u8>,
    ) -> Step<()> {
        match r.peek() {
            Some(b'n') => {
                r.literal(b"null")?;
                if !self.nullable[c] {
                    return Err(Decline);
                }
                append_null(col);
                return Ok(());
            }
            None => return Err(Decline),
            _ => {}
        }
        match col {
            Col::Int64(b) => b.append_value(r.integer()?),
            Col::Int32(b) => b.append_value(i32::try_from(r.integer()?).map_err(|_| Decline)?),
            Col::Int16(b) => b.append_value(i16::try_from(r.integer()?).map_err(|_| Decline)?),
            Col::Bool(b) => match r.peek() {
                Some(b't') => {
                    r.literal(b"true")?;
                    b.append_value(true)
                }
                Some(b'f') => {
                    r.literal(b"false")?;
                    b.append_value(false)
                }
                _ => return Err(Decline),
            },
            Col::Utf8(b) => {
                r.expect(b'"')?;
                b.push(r.string(scratch)?)
            }
            Col::Timestamp(b, unit) => {
                if r.peek() == Some(b'"') {
                    r.i += 1;
                    let s = r.string(scratch)?;
                    // The function arrow-json's timestamp decoder calls,
                    // with the same time zone (UTC for a zone-less column)
                    // and the same conversion to the unit — after a fast
                    // path for the one layout producers mostly write.
                    let date = match plain_timestamp(s) {
                        Some(d) => d,
                        None => string_to_datetime(&chrono::Utc, utf8(s)?).map_err(|_| Decline)?,
                    };
                    b.append_value(match unit {
                        TimeUnit::Second => date.timestamp(),
                        TimeUnit::Millisecond => date.timestamp_millis(),
                        TimeUnit::Microsecond => date.timestamp_micros(),
                        TimeUnit::Nanosecond => date.timestamp_nanos_opt().ok_or(Decline)?,
                    })
                } else {
                    b.append_value(r.integer()?)
                }
            }
        }
        Ok(())
    }
}

fn append_null(col: &mut Col) {
    match col {
        Col::Int64(b) | Col::Timestamp(b, _) => b.append_null(),
        Col::Int32(b) => b.append_null(),
        Col::Int16(b) => b.append_null(),
        Col::Bool(b) => b.append_null(),
        Col::Utf8(b) => b.push_null(),
    }
}

fn finish(col: Col) -> Step<ArrayRef> {
    Ok(match col {
        Col::Int64(mut b) => Arc::new(b.finish()),
        Col::Int32(mut b) => Arc::new(b.finish()),
        Col::Int16(mut b) => Arc::new(b.finish()),
        Col::Bool(mut b) => Arc::new(b.finish()),
        Col::Utf8(t) => t.finish()?,
        Col::Timestamp(mut b, unit) => {
            let a = b.finish();
            match unit {
                TimeUnit::Second => Arc::new(a.reinterpret_cast::<TimestampSecondType>()),
                TimeUnit::Millisecond => Arc::new(a.reinterpret_cast::<TimestampMillisecondType>()),
                TimeUnit::Microsecond => Arc::new(a.reinterpret_cast::<TimestampMicrosecondType>()),
                TimeUnit::Nanosecond => Arc::new(a.reinterpret_cast::<TimestampNanosecondType>()),
            }
        }
    })
}

/// A text column built from raw string bytes, checked as UTF-8 once for
/// the whole column when it is finished rather than string by string:
/// one long validation runs at memory speed, while a call per string (four
/// or five per record) was ~14 % of a Kafka reader's CPU in the benchmark.
/// A batch with invalid UTF-8 anywhere is declined, as before.
struct Text {
    offsets: Vec<i32>,
    values: Vec<u8>,
    nulls: NullBufferBuilder,
}

impl Text {
    fn with_capacity(rows: usize, bytes: usize) -> Text {
        let mut offsets = Vec::with_capacity(rows + 1);
        offsets.push(0);
        Text {
            offsets,
            values: Vec::with_capacity(bytes),
            nulls: NullBufferBuilder::new(rows),
        }
    }

    /// Appends a string's bytes. `decode_all` declines inputs of more than
    /// `i32::MAX` bytes, and a string is never longer unescaped than raw,
    /// so the offset fits.
    fn push(&mut self, s: &[u8]) {
        self.values.extend_from_slice(s);
        self.offsets.push(self.values.len() as i32);
        self.nulls.append_non_null();
    }

    fn push_null(&mut self) {
        self.offsets.push(self.values.len() as i32);
        self.nulls.append_null();
    }

    /// The column; declines when the bytes are not UTF-8 (`try_new`
    /// validates them, and that every offset is on a character boundary).
    fn finish(mut self) -> Step<ArrayRef> {
        let offsets = OffsetBuffer::new(ScalarBuffer::from(self.offsets));
        let values = Buffer::from_vec(self.values);
        let array =
            StringArray::try_new(offsets, values, self.nulls.finish()).map_err(|_| Decline)?;
        Ok(Arc::new(array))
    }
}

/// The index of the first byte of `s` that ends a plain run of JSON string
/// content: a quote, a backslash or a control byte (< 0x20, which JSON
/// wants escaped). Eight bytes at a time: with the borrow trick, `(x - 0x01…) & !x & 0x80…`
/// is non-zero exactly when some byte of `x` is zero, and `(x - 0x20…) &
/// !x & 0x80…` when some byte is below 0x20; a word with a hit is searched
/// byte by byte. One pass instead of a `memchr2` for the quote plus a scan
/// for control bytes.
fn plain_run(s: &[u8]) -> Option<usize> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    let mut at = 0;
    for word in s.chunks_exact(8) {
        let mut w = [0u8; 8];
        w.copy_from_slice(word);
        let w = u64::from_le_bytes(w);
        let quote = w ^ (ONES * u64::from(b'"'));
        let slash = w ^ (ONES * u64::from(b'\\'));
        let hits = (quote.wrapping_sub(ONES) & !quote)
            | (slash.wrapping_sub(ONES) & !slash)
            | (w.wrapping_sub(ONES * 0x20) & !w);
        if hits & HIGHS != 0 {
            break;
        }
        at += 8;
    }
    s[at..]
        .iter()
        .position(|&c| c == b'"' || c == b'\\' || c < 0x20)
        .map(|p| at + p)
}

/// A cursor over one record's bytes.
struct Reader<'a> {
    b: &'a [u8],
    i: usize,
}

impl<'a> Reader<'a> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn bump(&mut self) -> Step<u8> {
        let c = self.peek().ok_or(Decline)?;
        self.i += 1;
        Ok(c)
    }

    fn expect(&mut self, c: u8) -> Step<()> {
        if self.bump()? == c {
            Ok(())
        } else {
            Err(Decline)
        }
    }

    /// JSON whitespace, as arrow-json's tape decoder defines it.
    fn ws(&mut self) {
        while let Some(b' ' | b'\n' | b'\r' | b'\t') = self.peek() {
            self.i += 1;
        }
    }

    /// At the start of an object's or array's contents: whether it is
    /// empty (`close` follows at once, and is consumed).
    fn closes(&mut self, close: u8) -> bool {
        let empty = self.peek() == Some(close);
        if empty {
            self.i += 1;
        }
        empty
    }

    /// After a member or element: `,` (and whitespace) to go on, or
    /// `close` to end. Returns whether it ended.
    fn next_or_close(&mut self, close: u8) -> Step<bool> {
        self.ws();
        match self.bump()? {
            b',' => {
                self.ws();
                Ok(false)
            }
            c if c == close => Ok(true),
            _ => Err(Decline),
        }
    }

    fn literal(&mut self, word: &[u8]) -> Step<()> {
        if self.b[self.i..].starts_with(word) {
            self.i += word.len();
            Ok(())
        } else {
            Err(Decline)
        }
    }

    /// A field name after its opening quote: no escapes, no control
    /// bytes. Not yet checked as UTF-8 (one that names a column is).
    fn plain_key(&mut self) -> Step<&'a [u8]> {
        let rest = &self.b[self.i..];
        let end = plain_run(rest).ok_or(Decline)?;
        if rest[end] != b'"' {
            return Err(Decline);
        }
        self.i += end + 1;
        Ok(&rest[..end])
    }

    /// A string after its opening quote, unescaped (in `scratch` when it
    /// had escapes). Its bytes are not yet checked as UTF-8: the caller
    /// does, or [`Text::finish`] does for a whole column.
    fn string<'s>(&mut self, scratch: &'s mut Vec<u8>) -> Step<&'s [u8]>
    where
        'a: 's,
    {
        let rest = &self.b[self.i..];
        let end = plain_run(rest).ok_or(Decline)?;
        match rest[end] {
            b'"' => {
                self.i += end + 1;
                return Ok(&rest[..end]);
            }
            b'\\' => {}
            // A raw control byte: arrow-json decides what to make of it.
            _ => return Err(Decline),
        }
        scratch.clear();
        let mut at = 0;
        loop {
            let rest = &self.b[self.i + at..];
            let end = plain_run(rest).ok_or(Decline)?;
            scratch.extend_from_slice(&rest[..end]);
            at += end + 1;
            match rest[end] {
                b'"' => break,
                b'\\' => {}
                _ => return Err(Decline),
            }
            let esc = *rest.get(end + 1).ok_or(Decline)?;
            at += 1;
            match esc {
                b'"' | b'\\' | b'/' => scratch.push(esc),
                b'b' => scratch.push(0x08),
                b'f' => scratch.push(0x0C),
                b'n' => scratch.push(b'\n'),
                b'r' => scratch.push(b'\r'),
                b't' => scratch.push(b'\t'),
                b'u' => {
                    let hex = rest.get(end + 2..end + 6).ok_or(Decline)?;
                    // Exactly four hex digits, as arrow-json reads them
                    // (`from_str_radix` would also take a sign: `\u+041`).
                    let code = hex
                        .iter()
                        .try_fold(0u32, |v, &b| Some(v * 16 + char::from(b).to_digit(16)?))
                        .ok_or(Decline)?;
                    // Surrogate pairs (and lone surrogates) go to arrow-json.
                    let ch = char::from_u32(code).ok_or(Decline)?;
                    let mut buf = [0u8; 4];
                    scratch.extend_from_slice(ch.encode_utf8(&mut buf).as_bytes());
                    at += 4;
                }
                _ => return Err(Decline),
            }
        }
        self.i += at;
        Ok(scratch)
    }

    /// A JSON integer of at most 18 digits (so it fits an i64 exactly),
    /// followed by a delimiter. Fractions and exponents decline.
    fn integer(&mut self) -> Step<i64> {
        let neg = self.peek() == Some(b'-');
        if neg {
            self.i += 1;
        }
        let start = self.i;
        let mut v: i64 = 0;
        while let Some(d @ b'0'..=b'9') = self.peek() {
            // Counted before the multiply: 18 digits cannot overflow.
            if self.i - start == 18 {
                return Err(Decline);
            }
            v = v * 10 + (d - b'0') as i64;
            self.i += 1;
        }
        let digits = self.i - start;
        if digits == 0 || (digits > 1 && self.b[start] == b'0') {
            return Err(Decline);
        }
        match self.peek() {
            Some(b',' | b'}' | b' ' | b'\n' | b'\r' | b'\t') => Ok(if neg { -v } else { v }),
            _ => Err(Decline),
        }
    }

    /// Skips the value of a field no column takes, checking it is valid
    /// JSON (arrow-json rejects a record with a malformed ignored field).
    fn skip_value(&mut self, depth: usize, scratch: &mut Vec<u8>) -> Step<()> {
        if depth > MAX_DEPTH {
            return Err(Decline);
        }
        match self.peek().ok_or(Decline)? {
            b'"' => {
                self.i += 1;
                utf8(self.string(scratch)?).map(|_| ())
            }
            b'n' => self.literal(b"null"),
            b't' => self.literal(b"true"),
            b'f' => self.literal(b"false"),
            b'-' | b'0'..=b'9' => self.number(),
            b'{' => {
                self.i += 1;
                self.ws();
                if self.closes(b'}') {
                    return Ok(());
                }
                loop {
                    self.expect(b'"')?;
                    utf8(self.string(scratch)?)?;
                    self.ws();
                    self.expect(b':')?;
                    self.ws();
                    self.skip_value(depth + 1, scratch)?;
                    if self.next_or_close(b'}')? {
                        return Ok(());
                    }
                }
            }
            b'[' => {
                self.i += 1;
                self.ws();
                if self.closes(b']') {
                    return Ok(());
                }
                loop {
                    self.skip_value(depth + 1, scratch)?;
                    if self.next_or_close(b']')? {
                        return Ok(());
                    }
                }
            }
            _ => Err(Decline),
        }
    }

    /// A JSON number, strictly by the grammar.
    fn number(&mut self) -> Step<()> {
        if self.peek() == Some(b'-') {
            self.i += 1;
        }
        match self.bump()? {
            b'0' => {}
            b'1'..=b'9' => self.digits(),
            _ => return Err(Decline),
        }
        if self.peek() == Some(b'.') {
            self.i += 1;
            self.some_digits()?;
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.i += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.i += 1;
            }
            self.some_digits()?;
        }
        match self.peek() {
            Some(b',' | b'}' | b']' | b' ' | b'\n' | b'\r' | b'\t') => Ok(()),
            _ => Err(Decline),
        }
    }

    fn digits(&mut self) {
        while let Some(b'0'..=b'9') = self.peek() {
            self.i += 1;
        }
    }

    fn some_digits(&mut self) -> Step<()> {
        let start = self.i;
        self.digits();
        if self.i == start {
            Err(Decline)
        } else {
            Ok(())
        }
    }
}

/// `YYYY-MM-DDTHH:MM:SS` (`T`, `t` or a space between) with an optional
/// fraction of 1 to 9 digits and no zone, as UTC — what
/// `string_to_datetime(&Utc, s)` makes of it (the timestamp benchmark's
/// records all look like this; `string_to_datetime` and its time-zone
/// handling were ~10 % of the reader's CPU). Anything else, a leap second
/// included, is `None`: the caller asks `string_to_datetime`.
fn plain_timestamp(s: &[u8]) -> Option<chrono::DateTime<chrono::Utc>> {
    let digits = |r: std::ops::Range<usize>| -> Option<u32> {
        s.get(r)?.iter().try_fold(0u32, |v, &b| {
            b.is_ascii_digit().then(|| v * 10 + u32::from(b - b'0'))
        })
    };
    if s.len() < 19
        || s[4] != b'-'
        || s[7] != b'-'
        || !matches!(s[10], b'T' | b't' | b' ')
        || s[13] != b':'
        || s[16] != b':'
    {
        return None;
    }
    let nanos = match s.len() {
        19 => 0,
        21..=29 if s[19] == b'.' => digits(20..s.len())? * 10u32.pow(29 - s.len() as u32),
        _ => return None,
    };
    let second = digits(17..19)?;
    if second > 59 {
        return None;
    }
    let date = chrono::NaiveDate::from_ymd_opt(
        i32::try_from(digits(0..4)?).ok()?,
        digits(5..7)?,
        digits(8..10)?,
    )?;
    let time =
        chrono::NaiveTime::from_hms_nano_opt(digits(11..13)?, digits(14..16)?, second, nanos)?;
    Some(date.and_time(time).and_utc())
}

/// String bytes as text, or declined.
fn utf8(s: &[u8]) -> Step<&str> {
    std::str::from_utf8(s).map_err(|_| Decline)
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::datatypes::{Field, Schema};
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn schema() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("a", DataType::Int64, true),
            Field::new("b", DataType::Utf8, true),
            Field::new("t", DataType::Timestamp(TimeUnit::Microsecond, None), true),
            Field::new("c", DataType::Int32, true),
            Field::new("d", DataType::Boolean, true),
            Field::new("s", DataType::Int16, true),
            Field::new("nn", DataType::Int64, false),
            Field::new("ms", DataType::Timestamp(TimeUnit::Millisecond, None), true),
        ]))
    }

    /// What arrow-json makes of the records (the way `RecordDecoder`
    /// configures it), or `None` when it fails.
    fn arrow_json(schema: &SchemaRef, records: &[&[u8]]) -> Option<RecordBatch> {
        let mut d = datafusion::arrow::json::ReaderBuilder::new(schema.clone())
            .with_batch_size(records.len() + 1)
            .with_coerce_primitive(true)
            .build_decoder()
            .ok()?;
        for r in records {
            let before = d.len();
            let mut bytes: &[u8] = r;
            while !bytes.is_empty() {
                let used = d.decode(bytes).ok()?;
                if used == 0 {
                    return None;
                }
                bytes = &bytes[used..];
            }
            if d.len() != before + 1 {
                return None;
            }
        }
        let b = d.flush().ok()??;
        (b.num_rows() == records.len()).then_some(b)
    }

    #[test]
    fn decodes_what_arrow_json_decodes() {
        let s = schema();
        let flat = FlatJson::new(s.clone()).unwrap();
        let records: Vec<&[u8]> = vec![
            br#"{"a": 1, "b": "x", "t": "2023-11-14T22:13:20.123456", "c": -5, "d": true, "s": 7, "nn": 0, "ms": "2023-11-14 22:13:20"}"#,
            br#" {"nn":-123456789012345678,"b":"esc \" \\ \/ \n \u00e9 \u4e2d","a":null,"zz":{"q":[1,2.5e-3,{"r":null}],"w":"\u00e9"}} "#,
            r#"{"nn": 5, "t": 1700000000000000, "d": false, "b": "héllo"}"#.as_bytes(),
            b"{\"nn\":1}\n",
        ];
        let ours = flat.decode(&records).expect("the fast path takes these");
        assert_eq!(Some(ours), arrow_json(&s, &records));
    }

    #[test]
    fn declines_what_it_does_not_own() {
        let s = schema();
        for bad in [
            &br#"{"nn": 1, "a": 1.5}"#[..],       // float in an integer column
            br#"{"nn": 1, "b": 12}"#,             // number in a text column
            br#"{"a": 1}"#,                       // NOT NULL column missing
            br#"{"nn": 1, "nn": 2}"#,             // a field twice
            br#"{"nn": 1} {"nn": 2}"#,            // two objects
            br#"{"nn": 1, "b": "\ud83d\ude00"}"#, // surrogate pair
            br#"{"nn": 1, "c": 3000000000}"#,     // out of INT range
            br#"{"nn": 01}"#,                     // leading zero
            br#"{"nn": 1,}"#,                     // trailing comma
            br#"{"nn": 1, "t": "yesterday"}"#,    // not a timestamp
            br#"{"nn": 1, "x": [1, }"#,           // malformed ignored field
            br#"[1]"#,
            b"",
            br#"{"nn": 1, "b": "\u+041"}"#, // a sign is not a hex digit
            br#"{"nn": 1, "zz": "\u+041"}"#, // … in an ignored field
            br#"{"nn": 1, "zz": {"\u+041": 1}}"#, // … in an ignored key
            br#"{"nn": 9999999999999999999}"#, // 19 digits (no overflow)
            br#"{"nn": -9223372036854775808}"#, // i64::MIN, 19 digits
            b"\xEF\xBB\xBF{\"nn\": 1}",     // byte order mark
            b"{\"nn\": 1, \"b\": \"a\x01b\"}", // raw control character
            b"{\"nn\": 1, \"b\": \"\xC3\"}", // invalid UTF-8
        ] {
            let flat = FlatJson::new(s.clone()).unwrap();
            assert!(
                flat.decode(&[bad]).is_none(),
                "took {:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn plain_runs_end_where_a_byte_loop_says() {
        let mut rng = StdRng::seed_from_u64(11);
        let alphabet = [
            b'a', b'"', b'\\', 0x00, 0x1F, 0x20, 0x7F, 0x80, 0xC3, 0xFF, b'~',
        ];
        for _ in 0..20_000 {
            let len = rng.random_range(0..40);
            let s: Vec<u8> = (0..len)
                .map(|_| {
                    // Mostly plain bytes, so runs are often longer than a word.
                    if rng.random_range(0..12) == 0 {
                        alphabet[rng.random_range(0..alphabet.len())]
                    } else {
                        rng.random_range(0x20..0x7F)
                    }
                })
                .collect();
            let want = s.iter().position(|&c| c == b'"' || c == b'\\' || c < 0x20);
            assert_eq!(plain_run(&s), want, "{s:?}");
        }
    }

    #[test]
    fn plain_timestamps_are_what_string_to_datetime_makes_of_them() {
        let mut rng = StdRng::seed_from_u64(5);
        let (mut fast, mut total) = (0, 0);
        for _ in 0..50_000 {
            let mut t = format!(
                "{:04}-{:02}-{:02}{}{:02}:{:02}:{:02}",
                [1970, 1969, 2023, 2024, 1, 9999, 1900][rng.random_range(0..7)],
                rng.random_range(0..14),
                rng.random_range(0..33),
                ["T", "t", " ", "x"][rng.random_range(0..4)],
                rng.random_range(0..25),
                rng.random_range(0..61),
                rng.random_range(0..62),
            );
            let frac = rng.random_range(0..13);
            if frac > 0 {
                t.push('.');
                for _ in 0..frac {
                    t.push(char::from(b'0' + rng.random_range(0..10u8)));
                }
            }
            t.push_str(["", "", "", "Z", "+02:00", " ", "a"][rng.random_range(0..7)]);
            let mut b = t.into_bytes();
            if rng.random_range(0..10) == 0 {
                let i = rng.random_range(0..b.len());
                b[i] = [b'-', b':', b'.', b'+', b'9', b'/'][rng.random_range(0..6)];
            }
            if rng.random_range(0..20) == 0 {
                b.truncate(rng.random_range(0..b.len()));
            }
            let theirs = std::str::from_utf8(&b)
                .ok()
                .and_then(|s| string_to_datetime(&chrono::Utc, s).ok());
            total += 1;
            if let Some(ours) = plain_timestamp(&b) {
                fast += 1;
                assert_eq!(Some(ours), theirs, "{:?}", String::from_utf8_lossy(&b));
            }
        }
        assert!(fast * 10 > total, "fast path took {fast} of {total}");
    }

    #[test]
    fn expected_keys_are_matched_exactly() {
        let s = Arc::new(Schema::new(vec![
            Field::new("", DataType::Int64, true),
            Field::new("a", DataType::Int64, true),
            Field::new("ab", DataType::Int64, true),
            Field::new("fifteen_bytes_x", DataType::Int64, true),
            Field::new("sixteen_bytes_xy", DataType::Int64, true),
            Field::new("é", DataType::Int64, true),
        ]));
        let flat = FlatJson::new(s.clone()).unwrap();
        let records: Vec<&[u8]> = vec![
            r#"{"": 1, "a": 2, "ab": 3, "fifteen_bytes_x": 4, "sixteen_bytes_xy": 5, "é": 6}"#
                .as_bytes(),
            // A key extending the expected name, a key the expected name
            // extends, and names out of order.
            br#"{"a": 1, "abc": 2, "ab": 3, "fifteen_bytes": 4, "fifteen_bytes_xy": 5}"#,
            br#"{"sixteen_bytes_xy": 1, "fifteen_bytes_x": 2, "": 3, "ab": 4, "a": 5}"#,
            // The expected name at the very end (fewer than 16 bytes left).
            br#"{"":0,"a":1}"#,
            br#"{"a":1,"ab":2}"#,
        ];
        let ours = flat.decode(&records).expect("the fast path takes these");
        assert_eq!(Some(ours), arrow_json(&s, &records));
    }

    #[test]
    fn no_fast_path_for_duplicate_column_names() {
        let s = Arc::new(Schema::new(vec![
            Field::new("x", DataType::Int64, true),
            Field::new("y", DataType::Int64, true),
            Field::new("x", DataType::Int64, true),
        ]));
        assert!(FlatJson::new(s).is_none());
    }

    #[test]
    fn steps_aside_after_a_declined_batch() {
        let flat = FlatJson::new(schema()).unwrap();
        let good: &[u8] = br#"{"nn": 1}"#;
        assert!(flat.decode(&[br#"{"nn": 1.5}"#]).is_none());
        for _ in 0..RETRY_AFTER {
            assert!(flat.decode(&[good]).is_none());
        }
        assert!(flat.decode(&[good]).is_some());
    }

    /// A random value for a field: mostly well-typed, sometimes not.
    fn value(rng: &mut StdRng, kind: usize, clean: bool) -> String {
        let pick = rng.random_range(if clean { 10 } else { 0 }..20);
        match (kind, pick) {
            (_, 0) => "null".into(),
            (_, 1) => format!("{}.{}", rng.random_range(-99..99), rng.random_range(0..99)),
            (_, 2) => "\"12\"".into(),
            (_, 3) => "true".into(),
            (_, 4) => match rng.random_range(0..4) {
                0 => "-9223372036854775808".into(),
                1 => "9999999999999999999".into(),
                2 => "-999999999999999999".into(),
                _ => format!("{}", rng.random::<i64>()),
            },
            (_, 5) => "[1, \"x\", {\"y\": null}]".into(),
            (_, 6) => "\"2023-02-30T00:00:00\"".into(),
            (_, 7) => match rng.random_range(0..3) {
                0 => "\"\\ud83d\\ude00 \\u0041\\t\"".into(),
                1 => "\"\\u+041\"".into(),
                _ => "{\"\\u+041\": 1}".into(),
            },
            (_, 8) => "-0".into(),
            (_, 9) => "1e3".into(),
            (0 | 3 | 5, _) => format!("{}", rng.random_range(-40000i64..40000)),
            (1, _) => {
                let len = rng.random_range(0..12);
                let s: String = (0..len)
                    .map(|_| match rng.random_range(0..10) {
                        0 => "\\n".to_string(),
                        1 => "\\\"".to_string(),
                        2 => "é".to_string(),
                        3 => "\\u00fc".to_string(),
                        4 => ["\\/", "\\b", "\\f", "\\r", "\\u00E9", "\\u0000"]
                            [rng.random_range(0..6)]
                        .to_string(),
                        // Replaced by a raw control or non-UTF-8 byte below.
                        5 if !clean && rng.random_range(0..4) == 0 => "~".to_string(),
                        6 => "http://www.example.com/x".to_string(),
                        _ => ((b'a' + rng.random_range(0..26u8)) as char).to_string(),
                    })
                    .collect();
                format!("\"{s}\"")
            }
            (2 | 7, _) => match rng.random_range(0..4) {
                0 => format!(
                    "\"2023-11-{:02}T10:11:12.{:06}\"",
                    rng.random_range(1..31),
                    rng.random_range(0..999999)
                ),
                1 => format!("\"2024-01-0{} 01:02:03+02:00\"", rng.random_range(1..9)),
                2 => format!("{}", rng.random_range(0..2_000_000_000_000i64)),
                _ => "\"2023-11-14\"".into(),
            },
            (4, _) => {
                if rng.random() {
                    "true".into()
                } else {
                    "false".into()
                }
            }
            (6, _) => format!("{}", rng.random_range(-5i64..5)),
            // A field no column takes: any valid JSON, which the fast path
            // must skip exactly as strictly as arrow-json.
            (8, _) => [
                "null",
                "[1, \"x\", {\"y\": null}]",
                "{\"k\": \"\\\"x\\\"\", \"l\": [true, -0.5e+3, 1E-2]}",
                "\"\\u00e9\\/\\n\"",
                "123456789012345678901234567890",
                "-0.0",
                "[[[[[]]]]]",
                "{}",
            ][rng.random_range(0..8)]
            .into(),
            _ => "null".into(),
        }
    }

    #[test]
    fn random_records_agree_with_arrow_json() {
        let s = schema();
        let names = ["a", "b", "t", "c", "d", "s", "nn", "ms", "other"];
        let mut rng = StdRng::seed_from_u64(7);
        let (mut taken, mut batches) = (0, 0);
        for _ in 0..3000 {
            let n = rng.random_range(1..4);
            // Half the batches hold only well-typed values (which the fast
            // path must take), half anything.
            let clean = rng.random();
            let records: Vec<Vec<u8>> = (0..n)
                .map(|_| {
                    let mut fields: Vec<String> = Vec::new();
                    for (k, name) in names.iter().enumerate() {
                        if rng.random_range(0..6) == 0 && k != 6 {
                            continue;
                        }
                        fields.push(format!("\"{name}\":{}", value(&mut rng, k, clean)));
                    }
                    if rng.random_range(0..4) == 0 {
                        let i = rng.random_range(0..fields.len());
                        let j = rng.random_range(0..fields.len());
                        fields.swap(i, j);
                    }
                    let sep = [",", ", ", " ,\t", "\r\n,\n"][rng.random_range(0..4)];
                    let fields = if rng.random_range(0..3) == 0 {
                        fields
                            .iter()
                            .map(|f| f.replacen("\":", "\" : ", 1))
                            .collect()
                    } else {
                        fields
                    };
                    let pad = [" ", "", "\n", "\t\r\n"];
                    format!(
                        "{}{{{}}}{}",
                        pad[rng.random_range(0..4)],
                        fields.join(sep),
                        pad[rng.random_range(0..4)]
                    )
                    .into_bytes()
                    .into_iter()
                    .map(|b| match b {
                        b'~' => [0x01, 0x1F, 0xC3, 0xFF, 0x80][rng.random_range(0..5)],
                        b => b,
                    })
                    .collect()
                })
                .collect();
            let refs: Vec<&[u8]> = records.iter().map(|r| r.as_slice()).collect();
            let flat = FlatJson::new(s.clone()).unwrap();
            batches += 1;
            if let Some(ours) = flat.decode(&refs) {
                taken += 1;
                let theirs = arrow_json(&s, &refs);
                assert_eq!(
                    Some(&ours),
                    theirs.as_ref(),
                    "records: {:?}",
                    records
                        .iter()
                        .map(|r| String::from_utf8_lossy(r))
                        .collect::<Vec<_>>()
                );
            }
        }
        // Most values are well-typed: the fast path must take a good share
        // of batches, or this test would check nothing.
        assert!(taken * 3 > batches, "took {taken} of {batches} batches");
    }
}
