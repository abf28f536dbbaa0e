//! TensorBoard event files: scalars (loss, learning rate, validation loss) and sample images, in
//! the TFRecord framing TensorBoard reads (length, masked CRC-32C, `Event` protobuf, masked
//! CRC-32C). The few protobuf fields needed are encoded by hand rather than pulling in a protobuf
//! toolchain.

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

pub struct EventWriter {
    file: File,
    path: PathBuf,
}

fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A length-delimited field (wire type 2).
fn bytes_field(field: u32, data: &[u8], out: &mut Vec<u8>) {
    varint(((field << 3) | 2) as u64, out);
    varint(data.len() as u64, out);
    out.extend_from_slice(data);
}

fn varint_field(field: u32, v: u64, out: &mut Vec<u8>) {
    varint((field << 3) as u64, out);
    varint(v, out);
}

/// CRC-32C masked as TFRecord does, so that a CRC of data holding CRCs stays well spread.
pub fn masked_crc(data: &[u8]) -> u32 {
    let c = crc32c::crc32c(data);
    (c.rotate_right(15)).wrapping_add(0xa282_ead8)
}

fn wall_time() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

impl EventWriter {
    /// A new event file in `dir` (`events.out.tfevents.<time>.ferrite`).
    pub fn create(dir: &Path) -> io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join(format!(
            "events.out.tfevents.{}.ferrite",
            wall_time() as u64
        ));
        let mut w = Self {
            file: File::create(&path)?,
            path,
        };
        let mut event = Vec::new();
        w.event_header(0, &mut event);
        bytes_field(3, b"brain.Event:2", &mut event);
        w.record(&event)?;
        Ok(w)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn event_header(&self, step: u64, out: &mut Vec<u8>) {
        out.push((1 << 3) | 1);
        out.extend_from_slice(&wall_time().to_le_bytes());
        varint_field(2, step, out);
    }

    fn record(&mut self, data: &[u8]) -> io::Result<()> {
        let len = (data.len() as u64).to_le_bytes();
        let mut rec = Vec::with_capacity(data.len() + 16);
        rec.extend_from_slice(&len);
        rec.extend_from_slice(&masked_crc(&len).to_le_bytes());
        rec.extend_from_slice(data);
        rec.extend_from_slice(&masked_crc(data).to_le_bytes());
        self.file.write_all(&rec)?;
        self.file.flush()
    }

    /// Writes one summary value (`tag` plus the value's encoded fields) at `step`.
    fn summary(&mut self, step: u64, tag: &str, value_fields: &[u8]) -> io::Result<()> {
        let mut value = Vec::new();
        bytes_field(1, tag.as_bytes(), &mut value);
        value.extend_from_slice(value_fields);
        let mut summary = Vec::new();
        bytes_field(1, &value, &mut summary);
        let mut event = Vec::new();
        self.event_header(step, &mut event);
        bytes_field(5, &summary, &mut event);
        self.record(&event)
    }

    pub fn scalar(&mut self, tag: &str, step: u64, v: f32) -> io::Result<()> {
        let mut f = vec![(2 << 3) | 5];
        f.extend_from_slice(&v.to_le_bytes());
        self.summary(step, tag, &f)
    }

    /// A PNG-encoded RGB image.
    pub fn image(
        &mut self,
        tag: &str,
        step: u64,
        width: u32,
        height: u32,
        png: &[u8],
    ) -> io::Result<()> {
        let mut img = Vec::new();
        varint_field(1, height as u64, &mut img);
        varint_field(2, width as u64, &mut img);
        varint_field(3, 3, &mut img);
        bytes_field(4, png, &mut img);
        let mut f = Vec::new();
        bytes_field(4, &img, &mut f);
        self.summary(step, tag, &f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads the records back, checking both CRCs of each.
    fn records(bytes: &[u8]) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < bytes.len() {
            let len_bytes = &bytes[i..i + 8];
            let len = u64::from_le_bytes(len_bytes.try_into().unwrap()) as usize;
            let crc = u32::from_le_bytes(bytes[i + 8..i + 12].try_into().unwrap());
            assert_eq!(crc, masked_crc(len_bytes));
            let data = &bytes[i + 12..i + 12 + len];
            let crc = u32::from_le_bytes(bytes[i + 12 + len..i + 16 + len].try_into().unwrap());
            assert_eq!(crc, masked_crc(data));
            out.push(data.to_vec());
            i += 16 + len;
        }
        out
    }

    #[test]
    fn records_frame_and_encode_scalars() {
        // CRC-32C's published check value.
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
        let d = tempfile::tempdir().unwrap();
        let mut w = EventWriter::create(d.path()).unwrap();
        w.scalar("loss", 7, 0.25).unwrap();
        w.image("sample", 7, 1, 1, b"PNGDATA").unwrap();
        let recs = records(&std::fs::read(w.path()).unwrap());
        assert_eq!(recs.len(), 3);
        assert!(recs[0].ends_with(b"brain.Event:2"));
        // step 7, then summary { value { tag "loss", simple_value 0.25 } }.
        let s = &recs[1];
        assert_eq!(&s[9..11], &[0x10, 7]);
        let tail = [
            &[0x2a, 13, 0x0a, 11, 0x0a, 4][..],
            b"loss",
            &[0x15],
            &0.25f32.to_le_bytes(),
        ]
        .concat();
        assert!(s.ends_with(&tail), "{s:?}");
        assert!(recs[2].windows(7).any(|w| w == b"PNGDATA"));
    }
}
