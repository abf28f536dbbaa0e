//! Image augmentations beyond crop and flip: rotation (the mask turns with the image) and colour
//! changes (brightness, contrast, saturation, hue; the image only).

/// Rotates about the centre by `degrees`, keeping the size; uncovered corners take the nearest
/// edge pixel so no black wedges enter the training data.
pub fn rotate(img: &image::RgbImage, degrees: f64) -> image::RgbImage {
    if degrees == 0.0 {
        return img.clone();
    }
    let (w, h) = img.dimensions();
    let (cx, cy) = (w as f64 / 2.0, h as f64 / 2.0);
    let (sin, cos) = degrees.to_radians().sin_cos();
    image::RgbImage::from_fn(w, h, |x, y| {
        let (dx, dy) = (x as f64 + 0.5 - cx, y as f64 + 0.5 - cy);
        // The source of each output pixel: the inverse rotation.
        let sx = (cos * dx + sin * dy + cx - 0.5)
            .round()
            .clamp(0.0, w as f64 - 1.0);
        let sy = (-sin * dx + cos * dy + cy - 0.5)
            .round()
            .clamp(0.0, h as f64 - 1.0);
        *img.get_pixel(sx as u32, sy as u32)
    })
}

/// Colour changes, each a signed strength (0 = none).
#[derive(Debug, Clone, Copy, Default)]
pub struct Colour {
    /// Added to every channel.
    pub brightness: f64,
    /// Scales the distance from mid grey by 1 + contrast.
    pub contrast: f64,
    /// Scales the distance from the pixel's grey by 1 + saturation.
    pub saturation: f64,
    /// Turns the hue by this fraction of a full turn.
    pub hue: f64,
}

impl Colour {
    /// An RGB pixel in 0..1, changed and clamped back into 0..1.
    pub fn apply(&self, rgb: [f32; 3]) -> [f32; 3] {
        let mut p = rgb.map(f64::from);
        if self.hue != 0.0 {
            p = turn_hue(p, self.hue);
        }
        if self.saturation != 0.0 {
            let grey = 0.299 * p[0] + 0.587 * p[1] + 0.114 * p[2];
            p = p.map(|v| grey + (v - grey) * (1.0 + self.saturation));
        }
        if self.contrast != 0.0 {
            p = p.map(|v| 0.5 + (v - 0.5) * (1.0 + self.contrast));
        }
        p.map(|v| (v + self.brightness).clamp(0.0, 1.0) as f32)
    }
}

/// Rotates the colour about the grey axis by `turn` of a full circle (keeps luminance-ish).
fn turn_hue(p: [f64; 3], turn: f64) -> [f64; 3] {
    let (s, c) = (turn * std::f64::consts::TAU).sin_cos();
    let k = (1.0 - c) / 3.0;
    let r = (1.0f64 / 3.0).sqrt() * s;
    // Rodrigues' rotation about (1, 1, 1)/√3.
    let m = [
        [c + k, k - r, k + r],
        [k + r, c + k, k - r],
        [k - r, k + r, c + k],
    ];
    [0, 1, 2].map(|i| m[i][0] * p[0] + m[i][1] * p[1] + m[i][2] * p[2])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colour_changes_do_what_they_say() {
        let red = [0.8, 0.2, 0.2];
        let b = Colour {
            brightness: 0.1,
            ..Default::default()
        }
        .apply(red);
        assert!((b[0] - 0.9).abs() < 1e-6 && (b[1] - 0.3).abs() < 1e-6);
        let c = Colour {
            contrast: -1.0,
            ..Default::default()
        }
        .apply(red);
        assert_eq!(c, [0.5, 0.5, 0.5], "no contrast is mid grey");
        let s = Colour {
            saturation: -1.0,
            ..Default::default()
        }
        .apply(red);
        assert!(
            (s[0] - s[1]).abs() < 1e-6 && (s[1] - s[2]).abs() < 1e-6,
            "no saturation is grey"
        );
        // A third of a turn takes red to green.
        let h = Colour {
            hue: 1.0 / 3.0,
            ..Default::default()
        }
        .apply(red);
        assert!(h[1] > 0.7 && h[0] < 0.3 && h[2] < 0.3, "{h:?}");
        assert_eq!(Colour::default().apply(red), red.map(|v: f32| v));
    }

    #[test]
    fn rotation_turns_about_the_centre() {
        let img =
            image::RgbImage::from_fn(9, 9, |x, y| image::Rgb([x as u8 * 20, y as u8 * 20, 0]));
        assert_eq!(rotate(&img, 0.0), img);
        let r = rotate(&img, 90.0);
        assert_eq!(r.get_pixel(4, 4), img.get_pixel(4, 4), "the centre stays");
        // A quarter turn moves a row into a column.
        let row: Vec<u8> = (0..9).map(|x| img.get_pixel(x, 4)[0]).collect();
        let col: Vec<u8> = (0..9).map(|y| r.get_pixel(4, y)[0]).collect();
        assert!(
            col == row || col.iter().rev().copied().collect::<Vec<_>>() == row,
            "{col:?}"
        );
    }
}
