"""The shipped data, wrapped so that it is not a TensorDataset: the DataLoader path.
Tests use `Plain` directly, and copy this file beside a child process's config for
`data: plain_data.load`."""
import torch

from util import load_data


class Plain(torch.utils.data.Dataset):
    def __init__(self, inner):
        self.inner = inner

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, i):
        return self.inner[i]


def load(**kwargs):
    return tuple(Plain(d) for d in load_data(**kwargs))
