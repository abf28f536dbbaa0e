//! The image with its mask over it, and mask painting: a round brush that adds (255, trained) or
//! erases (0), fill, clear and undo; the parts outside the mask are shown dimmed.

use std::path::{Path, PathBuf};

use eframe::egui::{self, Ui};

/// A mask: one byte per pixel, 255 where the image is trained.
pub type Mask = Vec<u8>;

pub struct Canvas {
    image: Option<egui::ColorImage>,
    size: (usize, usize),
    image_tex: Option<egui::TextureHandle>,
    overlay_tex: Option<egui::TextureHandle>,
    overlay_stale: bool,
    /// None: the image has no mask file (and nothing was painted).
    pub mask: Option<Mask>,
    /// The mask before each stroke or fill (the last [`UNDO_STEPS`]).
    undo: Vec<Option<Mask>>,
    /// The mask file could not be read: painting is off, so that it is never written over.
    pub locked: bool,
    /// The last brush position of the stroke, in image pixels (strokes are joined).
    last: Option<egui::Vec2>,
    pub dirty: bool,
    /// Brush radius in image pixels.
    pub brush: f32,
    pub erase: bool,
}

impl Default for Canvas {
    fn default() -> Self {
        Self {
            image: None,
            size: (0, 0),
            image_tex: None,
            overlay_tex: None,
            overlay_stale: false,
            mask: None,
            undo: Vec::new(),
            locked: false,
            last: None,
            dirty: false,
            brush: 12.0,
            erase: false,
        }
    }
}

/// OneTrainer's undo depth.
const UNDO_STEPS: usize = 30;

/// The largest side of a texture the window uploads (GPUs refuse larger ones).
const MAX_TEXTURE: usize = 2048;

fn mask_path(image: &Path) -> PathBuf {
    crate::mask::mask_path(image)
}

/// `img` no larger than [`MAX_TEXTURE`] on a side, for showing.
fn for_display(img: image::RgbaImage) -> egui::ColorImage {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let img = if w.max(h) > MAX_TEXTURE {
        let f = MAX_TEXTURE as f32 / w.max(h) as f32;
        image::imageops::resize(
            &img,
            ((w as f32 * f) as u32).max(1),
            ((h as f32 * f) as u32).max(1),
            image::imageops::FilterType::Triangle,
        )
    } else {
        img
    };
    egui::ColorImage::from_rgba_unmultiplied(
        [img.width() as usize, img.height() as usize],
        img.as_raw(),
    )
}

impl Canvas {
    /// Shows `image` and its mask file, if it has one.
    pub fn load(&mut self, image: &Path) -> Result<(), String> {
        *self = Self {
            brush: self.brush,
            erase: self.erase,
            ..Self::default()
        };
        let rgba = crate::label::open_image(image)
            .map_err(|e| format!("{}: {e}", image.display()))?
            .to_rgba8();
        self.size = (rgba.width() as usize, rgba.height() as usize);
        self.image = Some(for_display(rgba));
        let path = mask_path(image);
        if path.exists() {
            // Until it is read, nothing may be painted over it.
            self.locked = true;
            let luma = image::open(&path)
                .map_err(|e| format!("{}: {e}; not editable here", path.display()))?
                .to_luma8();
            if (luma.width() as usize, luma.height() as usize) != self.size {
                return Err(format!(
                    "{} is {}x{}, its image {}x{}: not shown or editable",
                    path.display(),
                    luma.width(),
                    luma.height(),
                    self.size.0,
                    self.size.1
                ));
            }
            self.mask = Some(luma.into_raw());
            self.overlay_stale = true;
            self.locked = false;
        }
        Ok(())
    }

    pub fn save(&mut self, image: &Path) -> Result<PathBuf, String> {
        let Some(mask) = &self.mask else {
            return Err("no mask to save: paint or fill one".into());
        };
        let path = mask_path(image);
        crate::mask::write_mask_luma(&path, mask, self.size.0, self.size.1)
            .map_err(|e| e.to_string())?;
        self.dirty = false;
        Ok(path)
    }

    pub fn can_undo(&self) -> bool {
        !self.undo.is_empty()
    }

    pub fn undo(&mut self) {
        if let Some(m) = self.undo.pop() {
            self.mask = m;
            self.dirty = true;
            self.overlay_stale = true;
        }
    }

    fn checkpoint(&mut self) {
        if self.undo.len() == UNDO_STEPS {
            self.undo.remove(0);
        }
        self.undo.push(self.mask.clone());
    }

    pub fn fill(&mut self, value: u8) {
        if self.image.is_none() || self.locked {
            return;
        }
        self.checkpoint();
        self.mask = Some(vec![value; self.size.0 * self.size.1]);
        self.dirty = true;
        self.overlay_stale = true;
    }

    /// Paints a disc of the brush's radius at image pixel `(x, y)`. Without a mask the image
    /// was trained whole: erasing starts from all 255, adding from all 0 (OneTrainer's).
    pub fn paint(&mut self, x: f32, y: f32) {
        if self.locked {
            return;
        }
        let (w, h) = self.size;
        let start = if self.erase { 255 } else { 0 };
        let mask = self.mask.get_or_insert_with(|| vec![start; w * h]);
        let value = if self.erase { 0 } else { 255 };
        let r = self.brush;
        let (x0, x1) = (
            (x - r).floor().max(0.0) as usize,
            ((x + r).ceil() as usize).min(w),
        );
        let (y0, y1) = (
            (y - r).floor().max(0.0) as usize,
            ((y + r).ceil() as usize).min(h),
        );
        for py in y0..y1 {
            for px in x0..x1 {
                let (dx, dy) = (px as f32 + 0.5 - x, py as f32 + 0.5 - y);
                if dx * dx + dy * dy <= r * r {
                    mask[py * w + px] = value;
                }
            }
        }
        self.dirty = true;
        self.overlay_stale = true;
    }

    pub fn show(&mut self, ui: &mut Ui) {
        let Some(image) = &self.image else {
            return;
        };
        if self.image_tex.is_none() {
            self.image_tex = Some(ui.ctx().load_texture(
                "dataset image",
                image.clone(),
                egui::TextureOptions::LINEAR,
            ));
        }
        if self.overlay_stale {
            self.overlay_tex = self.mask.as_ref().map(|m| {
                // The untrained part darkened.
                let rgba: Vec<u8> = m
                    .iter()
                    .flat_map(|&v| [0, 0, 0, ((255 - v) as f32 * 0.6) as u8])
                    .collect();
                let overlay =
                    image::RgbaImage::from_raw(self.size.0 as u32, self.size.1 as u32, rgba)
                        .unwrap_or_default();
                ui.ctx().load_texture(
                    "dataset mask",
                    for_display(overlay),
                    egui::TextureOptions::NEAREST,
                )
            });
            self.overlay_stale = false;
        }
        let (w, h) = (self.size.0 as f32, self.size.1 as f32);
        let scale = (640.0 / w).min(480.0 / h);
        let (resp, painter) =
            ui.allocate_painter(egui::vec2(w * scale, h * scale), egui::Sense::drag());
        resp.widget_info(|| egui::WidgetInfo::labeled(egui::Role::Canvas, true, "Mask canvas"));
        let uv = egui::Rect::from_min_max(egui::pos2(0.0, 0.0), egui::pos2(1.0, 1.0));
        for t in [&self.image_tex, &self.overlay_tex].into_iter().flatten() {
            painter.image(t.id(), resp.rect, uv, egui::Color32::WHITE);
        }
        if resp.drag_started() && !self.locked {
            self.checkpoint();
            self.last = None;
        }
        if (resp.drag_started() || resp.dragged())
            && let Some(p) = resp.interact_pointer_pos()
        {
            let at = (p - resp.rect.min) / scale;
            // From the last point, in steps of half the brush, so that a fast drag is a line.
            let from = self.last.unwrap_or(at);
            let steps = ((at - from).length() / (self.brush / 2.0).max(0.5))
                .ceil()
                .max(1.0);
            for i in 1..=steps as usize {
                let q = from + (at - from) * (i as f32 / steps);
                self.paint(q.x, q.y);
            }
            self.last = Some(at);
        }
        if resp.drag_stopped() {
            self.last = None;
        }
        if let Some(p) = resp.hover_pos() {
            painter.circle_stroke(
                p,
                self.brush * scale,
                egui::Stroke::new(1.0, egui::Color32::LIGHT_BLUE),
            );
        }
    }
}
