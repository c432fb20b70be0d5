//! Parquet tables, read row by row through the `parquet` crate's record API (no Arrow arrays:
//! a few thousand short texts do not need columnar compute, and Arrow doubles the build).
//!
//! Columns are the schema's top-level fields, by name or by 0-based position. A parquet file
//! has no lines, so the number a bad row is reported under is its 1-based row in the file,
//! counted across row groups.
use std::fs::File;

use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::Field;

use super::{Column, RawRow, RowSink, TableSpec};
use crate::{Error, Result};

pub(super) fn read_parquet(spec: &TableSpec, sink: &mut RowSink) -> Result<Vec<RawRow>> {
    let file = File::open(sink.path).map_err(|e| sink.file_error(e.to_string()))?;
    let reader = SerializedFileReader::new(file).map_err(|e| sink.file_error(format!("unreadable parquet: {e}")))?;
    let names: Vec<String> = reader
        .metadata()
        .file_metadata()
        .schema_descr()
        .root_schema()
        .get_fields()
        .iter()
        .map(|f| f.name().to_string())
        .collect();
    let find = |col: &Column| -> Result<usize> {
        match col {
            Column::Index(i) if *i < names.len() => Ok(*i),
            Column::Index(i) => Err(sink.file_error(format!("column {i} out of range: rows have {}", names.len()))),
            Column::Name(n) => names
                .iter()
                .position(|c| c == n)
                .ok_or_else(|| sink.file_error(format!("no column named '{n}' (columns: {})", names.join(", ")))),
        }
    };
    let text = find(&spec.text)?;
    let text_pair = spec.text_pair.as_ref().map(find).transpose()?;
    let label = spec.label.as_ref().map(find).transpose()?;
    let row_iter = reader.get_row_iter(None).map_err(|e| sink.file_error(format!("unreadable parquet: {e}")))?;
    let mut rows = Vec::new();
    for (i, row) in row_iter.enumerate() {
        let line = i + 1;
        // A decoding error leaves the page unreadable, so no later row can be trusted: not skippable.
        let row = row.map_err(|e| Error::BadRow { path: sink.path.to_path_buf(), line, detail: e.to_string() })?;
        let cells: Vec<Field> = row.into_columns().into_iter().map(|(_, f)| f).collect();
        let cell = |i: usize| (&cells[i], names[i].as_str());
        let picked = (|| {
            Ok(RawRow {
                line,
                text_a: as_text(cell(text))?,
                text_b: text_pair.map(|p| as_text(cell(p))).transpose()?,
                label: label.map(|l| as_label(cell(l))).transpose()?,
            })
        })();
        match picked {
            Ok(row) => rows.push(row),
            Err(reason) => sink.bad(line, reason)?,
        }
    }
    Ok(rows)
}

fn as_text((field, name): (&Field, &str)) -> std::result::Result<String, String> {
    match field {
        Field::Str(s) => Ok(s.clone()),
        // Writers that do not annotate strings as UTF8 leave them plain byte arrays.
        Field::Bytes(b) => String::from_utf8(b.data().to_vec()).map_err(|e| format!("column '{name}': {e}")),
        Field::Null => Err(format!("null in column '{name}'")),
        other => Err(format!("column '{name}' holds {other}, expected a string")),
    }
}

/// A label as the text loaders would see it, for [`super::resolve_labels`] to map: numbers in
/// Rust's shortest form (a float class `1.0` reads as `1`), booleans as `0`/`1`.
fn as_label((field, name): (&Field, &str)) -> std::result::Result<String, String> {
    Ok(match field {
        Field::Bool(b) => u8::from(*b).to_string(),
        Field::Byte(v) => v.to_string(),
        Field::Short(v) => v.to_string(),
        Field::Int(v) => v.to_string(),
        Field::Long(v) => v.to_string(),
        Field::UByte(v) => v.to_string(),
        Field::UShort(v) => v.to_string(),
        Field::UInt(v) => v.to_string(),
        Field::ULong(v) => v.to_string(),
        Field::Float16(v) => v.to_string(),
        Field::Float(v) => v.to_string(),
        Field::Double(v) => v.to_string(),
        Field::Str(_) | Field::Bytes(_) | Field::Null => as_text((field, name))?,
        other => return Err(format!("column '{name}' holds {other}, expected a string or a number")),
    })
}
