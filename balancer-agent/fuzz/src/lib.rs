//! What the fuzz targets share: how one input is cut into several.
#![forbid(unsafe_code)]

/// Cuts `data` into pieces, each written as a 2-byte big-endian length and that many bytes; the
/// last piece may be shorter than its length says (it takes what is left).
pub fn pieces(mut data: &[u8]) -> impl Iterator<Item = &[u8]> {
    std::iter::from_fn(move || {
        let (len, rest) = data.split_first_chunk::<2>()?;
        let (piece, tail) = rest.split_at(usize::from(u16::from_be_bytes(*len)).min(rest.len()));
        data = tail;
        Some(piece)
    })
}

/// Header fields as owned bytes, in order.
pub type FieldVec = Vec<(Vec<u8>, Vec<u8>)>;

/// The fields as `wire::message` walks them.
pub fn borrowed(fields: &FieldVec) -> impl Iterator<Item = (&[u8], &[u8])> {
    fields.iter().map(|(n, v)| (&n[..], &v[..]))
}
