"""Tests for kd/models/position_encoding.py."""

import torch

from kd.models.position_encoding import PositionEmbeddingSine, sine_embed


def test_sine_map_ignores_padding_extent():
    pe = PositionEmbeddingSine(16)
    mask = torch.zeros(2, 6, 8, dtype=torch.bool)
    mask[1, :, 4:] = True  # image 1 is half as wide: its positions are normalised to its own width
    pos = pe(mask)
    assert pos.shape == (2, 32, 6, 8)
    alone = pe(torch.zeros(1, 6, 4, dtype=torch.bool))
    torch.testing.assert_close(pos[1, :, :, :4], alone[0])


def test_sine_embed_box_layout():
    coords = torch.tensor([[0.25, 0.5, 0.1, 0.2]])
    out = sine_embed(coords, num_pos_feats=8)
    assert out.shape == (1, 32)
    # first block encodes y, second x: sin of the first frequency is sin(2*pi*c)
    torch.testing.assert_close(out[0, 0], torch.sin(torch.tensor(0.5 * 2 * torch.pi)))
    torch.testing.assert_close(out[0, 8], torch.sin(torch.tensor(0.25 * 2 * torch.pi)))
    assert sine_embed(coords[:, :2], num_pos_feats=8).shape == (1, 16)
