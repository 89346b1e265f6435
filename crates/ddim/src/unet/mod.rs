//! `UNet2DModel`, the noise-prediction network of DDPM/DDIM, following diffusers 0.42
//! `models/unets/unet_2d.py` with diffusers' weight names.

pub mod config;

pub use config::{
    Activation, ClassEmbedType, DownBlockType, MidBlockType, ResampleType, ResnetTimeScaleShift,
    TimeEmbeddingType, UNet2DConfig, UpBlockType,
};
