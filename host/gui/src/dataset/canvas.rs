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
    /// The mask before each stroke or fill.
    undo: Vec<Option<Mask>>,
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
            dirty: false,
            brush: 12.0,
            erase: false,
        }
    }
}

fn mask_path(image: &Path) -> PathBuf {
    crate::mask::mask_path(image)
}

impl Canvas {
    /// Shows `image` and its mask file, if it has one.
    pub fn load(&mut self, image: &Path) -> Result<(), String> {
        *self = Self {
            brush: self.brush,
            erase: self.erase,
            ..Self::default()
        };
        let rgba = image::open(image)
            .map_err(|e| format!("{}: {e}", image.display()))?
            .to_rgba8();
        self.size = (rgba.width() as usize, rgba.height() as usize);
        self.image = Some(egui::ColorImage::from_rgba_unmultiplied(
            [self.size.0, self.size.1],
            rgba.as_raw(),
        ));
        let path = mask_path(image);
        if path.exists() {
            let luma = image::open(&path)
                .map_err(|e| format!("{}: {e}", path.display()))?
                .to_luma8();
            if (luma.width() as usize, luma.height() as usize) != self.size {
                return Err(format!(
                    "{} is {}x{}, its image {}x{}: not shown",
                    path.display(),
                    luma.width(),
                    luma.height(),
                    self.size.0,
                    self.size.1
                ));
            }
            self.mask = Some(luma.into_raw());
            self.overlay_stale = true;
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
        self.undo.push(self.mask.clone());
    }

    pub fn fill(&mut self, value: u8) {
        if self.image.is_none() {
            return;
        }
        self.checkpoint();
        self.mask = Some(vec![value; self.size.0 * self.size.1]);
        self.dirty = true;
        self.overlay_stale = true;
    }

    /// Paints a disc of the brush's radius at image pixel `(x, y)`; a mask starts empty.
    pub fn paint(&mut self, x: f32, y: f32) {
        let (w, h) = self.size;
        let mask = self.mask.get_or_insert_with(|| vec![0; w * h]);
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
                ui.ctx().load_texture(
                    "dataset mask",
                    egui::ColorImage::from_rgba_unmultiplied([self.size.0, self.size.1], &rgba),
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
        if resp.drag_started() {
            self.checkpoint();
        }
        if (resp.drag_started() || resp.dragged())
            && let Some(p) = resp.interact_pointer_pos()
        {
            let at = (p - resp.rect.min) / scale;
            self.paint(at.x, at.y);
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
