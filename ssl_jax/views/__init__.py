"""Views: what a method's loss sees of an image, made on device inside the jitted step.

ops          per-image crops, flips, rotations, blur, solarize and normalisation
colour       colour jitter and grayscale with torchvision's semantics
photometric  PIRL's posterize / sharpness / solarize / autocontrast, PIL's semantics
augment      view configs (SimCLR's, MoCo v2's, NPID's, PIRL's, the eval view) and
             `view` / `batch_views`, which compose the ops per example
jigsaw       3x3 tiles of a crop and the permutation sets of Jigsaw and PIRL
canvas       views of images of varying size, decoded onto fixed canvases
pair         two images per example (video positives)
multicrop    G global and L local crops of each image, one recipe per crop
masking      iBOT / DINOv2 block masks over a ViT's patch grid
channels     RGB to Lab and the L / ab split of CMC's channel views

Pure functions of (rng, image, config): each vmaps over per-example keys.
"""
