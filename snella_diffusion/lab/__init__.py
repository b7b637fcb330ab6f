"""The personalization lab: a synthetic world of coloured shapes with exact decoders, a tiny
pretrained base that draws it, and the concept ``sks`` (an orange/purple checkerboard square)
that DreamBooth runs learn and the decoders score."""
