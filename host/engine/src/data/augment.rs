//! Image augmentations after the crop, in OneTrainer's order (mgds' RandomFlip, RandomRotate,
//! RandomBrightness, RandomContrast, RandomSaturation, RandomHue): flip and rotation apply to the
//! image and its mask, colour changes to the image only. Each has a random and a fixed variant;
//! the draws come from the caller's generator, one per enabled random option, in that order.

use rand::Rng;
use rand_chacha::ChaCha8Rng;

use crate::config::ConceptConfig;

/// An image in [0, 1], `channels` values per pixel, row by row.
#[derive(Debug, Clone, PartialEq)]
pub struct Planes {
    pub width: usize,
    pub height: usize,
    pub channels: usize,
    pub data: Vec<f32>,
}

impl Planes {
    /// An 8-bit image (RGB or grey) scaled to [0, 1].
    pub fn from_image<P: image::Pixel<Subpixel = u8>>(
        img: &image::ImageBuffer<P, Vec<u8>>,
    ) -> Self {
        Self {
            width: img.width() as usize,
            height: img.height() as usize,
            channels: P::CHANNEL_COUNT as usize,
            data: img.as_raw().iter().map(|&v| v as f32 / 255.0).collect(),
        }
    }

    fn pixel(&self, x: usize, y: usize) -> &[f32] {
        let i = (y * self.width + x) * self.channels;
        &self.data[i..i + self.channels]
    }

    fn flip_horizontal(&mut self) {
        let (w, c) = (self.width, self.channels);
        for row in self.data.chunks_exact_mut(w * c) {
            for x in 0..w / 2 {
                for k in 0..c {
                    row.swap(x * c + k, (w - 1 - x) * c + k);
                }
            }
        }
    }

    /// Turns counter-clockwise by `degrees` about the centre, keeping the size (torchvision's
    /// `rotate`, bilinear): uncovered corners are 0 (black; masked out in a mask).
    fn rotate(&self, degrees: f64) -> Self {
        let (w, h, c) = (self.width, self.height, self.channels);
        let (cx, cy) = (w as f64 / 2.0, h as f64 / 2.0);
        let (sin, cos) = degrees.to_radians().sin_cos();
        let mut data = vec![0f32; self.data.len()];
        for y in 0..h {
            for x in 0..w {
                let (dx, dy) = (x as f64 + 0.5 - cx, y as f64 + 0.5 - cy);
                // The inverse rotation gives where each output pixel comes from (y points down,
                // so a counter-clockwise turn on screen is clockwise in these coordinates).
                let sx = cos * dx - sin * dy + cx - 0.5;
                let sy = sin * dx + cos * dy + cy - 0.5;
                let (x0, y0) = (sx.floor(), sy.floor());
                let (fx, fy) = ((sx - x0) as f32, (sy - y0) as f32);
                let out = &mut data[(y * w + x) * c..(y * w + x + 1) * c];
                for (ox, oy, wgt) in [
                    (0, 0, (1.0 - fx) * (1.0 - fy)),
                    (1, 0, fx * (1.0 - fy)),
                    (0, 1, (1.0 - fx) * fy),
                    (1, 1, fx * fy),
                ] {
                    let (px, py) = (x0 as i64 + ox, y0 as i64 + oy);
                    if wgt == 0.0 || px < 0 || py < 0 || px >= w as i64 || py >= h as i64 {
                        continue;
                    }
                    for (o, v) in out.iter_mut().zip(self.pixel(px as usize, py as usize)) {
                        *o += wgt * v;
                    }
                }
            }
        }
        Self { data, ..*self }
    }

    /// `f·x + (1 − f)·base(pixel)`, clamped to [0, 1] (torchvision's blend).
    fn blend(&mut self, f: f32, base: impl Fn(&[f32]) -> f32) {
        for p in self.data.chunks_exact_mut(self.channels) {
            let b = base(p);
            for v in p {
                *v = (f * *v + (1.0 - f) * b).clamp(0.0, 1.0);
            }
        }
    }

    /// Shifts every pixel's hue by `turn` of a full circle through HSV (torchvision's
    /// `adjust_hue`).
    fn shift_hue(&mut self, turn: f32) {
        for p in self.data.chunks_exact_mut(self.channels) {
            let (h, s, v) = rgb_to_hsv(p[0], p[1], p[2]);
            let [r, g, b] = hsv_to_rgb((h + turn).rem_euclid(1.0), s, v);
            p.copy_from_slice(&[r, g, b]);
        }
    }
}

/// The grey value of an RGB pixel (ITU-R 601, as torchvision's rgb_to_grayscale).
fn grey(p: &[f32]) -> f32 {
    0.2989 * p[0] + 0.587 * p[1] + 0.114 * p[2]
}

fn rgb_to_hsv(r: f32, g: f32, b: f32) -> (f32, f32, f32) {
    let max = r.max(g).max(b);
    let min = r.min(g).min(b);
    let d = max - min;
    let s = if max > 0.0 { d / max } else { 0.0 };
    let h = if d == 0.0 {
        0.0
    } else if max == r {
        ((g - b) / d).rem_euclid(6.0) / 6.0
    } else if max == g {
        ((b - r) / d + 2.0) / 6.0
    } else {
        ((r - g) / d + 4.0) / 6.0
    };
    (h, s, max)
}

fn hsv_to_rgb(h: f32, s: f32, v: f32) -> [f32; 3] {
    let i = (h * 6.0).floor();
    let f = h * 6.0 - i;
    let (p, q, t) = (v * (1.0 - s), v * (1.0 - s * f), v * (1.0 - s * (1.0 - f)));
    match i as i32 % 6 {
        0 => [v, t, p],
        1 => [q, v, p],
        2 => [p, v, t],
        3 => [p, q, v],
        4 => [t, p, v],
        _ => [v, p, q],
    }
}

/// What was drawn for one image (also what the debug output and tests look at).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Drawn {
    pub flip: bool,
    /// Degrees, counter-clockwise.
    pub angle: f64,
    /// Factors (1 = unchanged).
    pub brightness: f64,
    pub contrast: f64,
    pub saturation: f64,
    /// Turns.
    pub hue: f64,
}

/// A factor around 1 (brightness, contrast, saturation): uniform in 1 ± strength when random,
/// exactly 1 + strength when fixed, never below 0.
fn factor(random: bool, fixed: bool, strength: f64, r: &mut ChaCha8Rng) -> f64 {
    if random {
        r.random_range((1.0 - strength).min(1.0 + strength)..=(1.0 + strength).max(1.0 - strength))
            .max(0.0)
    } else if fixed {
        (1.0 + strength).max(0.0)
    } else {
        1.0
    }
}

impl Drawn {
    /// Draws the concept's augmentations from `r`, in OneTrainer's order.
    pub fn draw(c: &ConceptConfig, r: &mut ChaCha8Rng) -> Self {
        let flip = if c.enable_random_flip {
            r.random_bool(0.5)
        } else {
            c.enable_fixed_flip
        };
        let m = c.random_rotate_max_angle.abs();
        let angle = if c.enable_random_rotate {
            r.random_range(-m..=m)
        } else if c.enable_fixed_rotate {
            c.random_rotate_max_angle
        } else {
            0.0
        };
        let brightness = factor(
            c.enable_random_brightness,
            c.enable_fixed_brightness,
            c.random_brightness_max_strength,
            r,
        );
        let contrast = factor(
            c.enable_random_contrast,
            c.enable_fixed_contrast,
            c.random_contrast_max_strength,
            r,
        );
        let saturation = factor(
            c.enable_random_saturation,
            c.enable_fixed_saturation,
            c.random_saturation_max_strength,
            r,
        );
        let half = c.random_hue_max_strength.abs() * 0.5;
        let hue = if c.enable_random_hue {
            r.random_range(-half..=half).clamp(-0.5, 0.5)
        } else if c.enable_fixed_hue {
            c.random_hue_max_strength * 0.5
        } else {
            0.0
        };
        Self {
            flip,
            angle,
            brightness,
            contrast,
            saturation,
            hue,
        }
    }

    /// Applies the drawn changes to the cropped image and its mask.
    pub fn apply(&self, image: &mut Planes, mask: &mut Planes) {
        if self.flip {
            image.flip_horizontal();
            mask.flip_horizontal();
        }
        if self.angle != 0.0 {
            *image = image.rotate(self.angle);
            *mask = mask.rotate(self.angle);
        }
        if self.brightness != 1.0 {
            image.blend(self.brightness as f32, |_| 0.0);
        }
        if self.contrast != 1.0 {
            let n = (image.width * image.height) as f32;
            let mean = image.data.chunks_exact(3).map(grey).sum::<f32>() / n;
            image.blend(self.contrast as f32, |_| mean);
        }
        if self.saturation != 1.0 {
            image.blend(self.saturation as f32, grey);
        }
        if self.hue != 0.0 {
            image.shift_hue(self.hue as f32);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(rgb: [f32; 3]) -> Planes {
        Planes {
            width: 1,
            height: 1,
            channels: 3,
            data: rgb.to_vec(),
        }
    }

    fn apply(d: Drawn, rgb: [f32; 3]) -> Vec<f32> {
        let mut img = one(rgb);
        let mut mask = one([1.0; 3]);
        d.apply(&mut img, &mut mask);
        img.data
    }

    const NONE: Drawn = Drawn {
        flip: false,
        angle: 0.0,
        brightness: 1.0,
        contrast: 1.0,
        saturation: 1.0,
        hue: 0.0,
    };

    #[test]
    fn colour_changes_follow_torchvision() {
        let red = [0.8, 0.2, 0.2];
        let close = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-5);
        // Brightness scales (and clamps).
        let b = apply(
            Drawn {
                brightness: 1.5,
                ..NONE
            },
            red,
        );
        assert!(close(&b, &[1.0, 0.3, 0.3]), "{b:?}");
        // No saturation is the pixel's grey.
        let s = apply(
            Drawn {
                saturation: 0.0,
                ..NONE
            },
            red,
        );
        let g = 0.2989 * 0.8 + 0.587 * 0.2 + 0.114 * 0.2;
        assert!(close(&s, &[g, g, g]), "{s:?}");
        // No contrast is the image's mean grey (one pixel: its own grey).
        let c = apply(
            Drawn {
                contrast: 0.0,
                ..NONE
            },
            red,
        );
        assert!(close(&c, &[g, g, g]), "{c:?}");
        // A third of a turn takes red to green.
        let h = apply(
            Drawn {
                hue: 1.0 / 3.0,
                ..NONE
            },
            red,
        );
        assert!(close(&h, &[0.2, 0.8, 0.2]), "{h:?}");
        assert_eq!(apply(NONE, red), red.to_vec());
    }

    #[test]
    fn a_quarter_turn_is_counter_clockwise_and_the_mask_turns_too() {
        let (w, h) = (4usize, 4usize);
        // The right half white, in the image and the mask.
        let half = |channels| Planes {
            width: w,
            height: h,
            channels,
            data: (0..w * h)
                .flat_map(|i| std::iter::repeat_n(if i % w >= w / 2 { 1.0 } else { 0.0 }, channels))
                .collect(),
        };
        let (mut img, mut mask) = (half(3), half(1));
        Drawn {
            angle: 90.0,
            ..NONE
        }
        .apply(&mut img, &mut mask);
        // Counter-clockwise: the right half goes to the top.
        let top: Vec<f32> = (0..w * h / 2).map(|i| mask.data[i]).collect();
        let bottom: Vec<f32> = (w * h / 2..w * h).map(|i| mask.data[i]).collect();
        assert!(top.iter().all(|&v| (v - 1.0).abs() < 1e-5), "{top:?}");
        assert!(bottom.iter().all(|&v| v.abs() < 1e-5), "{bottom:?}");
        assert_eq!(
            img.data.chunks(3).map(|p| p[0]).collect::<Vec<_>>(),
            mask.data
        );
        // 45°: the corners are uncovered, hence black (masked out); the middle stays.
        let ones = Planes {
            width: 16,
            height: 16,
            channels: 1,
            data: vec![1.0; 256],
        };
        let turned = ones.rotate(45.0);
        assert_eq!(turned.data[0], 0.0);
        assert!((turned.data[8 * 16 + 8] - 1.0).abs() < 1e-5);
    }
}
