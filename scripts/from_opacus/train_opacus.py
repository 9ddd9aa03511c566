"""Private training of a small CNN on scikit-learn's digits, written for Opacus: the script before porting."""

import argparse

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from dpclip_examples.digits import accuracy, load_data
from opacus import PrivacyEngine
from opacus.validators import ModuleValidator


def build_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 4 * 4, 10),
    )


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.5)
    parser.add_argument("--epsilon", type=float, default=3.0)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    args = parser.parse_args(argv)
    torch.manual_seed(0)

    train, test = load_data(torch.device("cpu"))
    train_loader = DataLoader(train, batch_size=args.batch_size, shuffle=True)
    model = ModuleValidator.fix(build_model())
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    criterion = nn.CrossEntropyLoss()

    privacy_engine = PrivacyEngine()
    model, optimizer, train_loader = privacy_engine.make_private_with_epsilon(
        module=model, optimizer=optimizer, data_loader=train_loader, target_epsilon=args.epsilon,
        target_delta=args.delta, epochs=args.epochs, max_grad_norm=args.max_grad_norm,
    )
    for epoch in range(args.epochs):
        model.train()
        for x, y in train_loader:
            optimizer.zero_grad()
            loss = criterion(model(x), y)
            loss.backward()
            optimizer.step()
        epsilon = privacy_engine.get_epsilon(args.delta)
        print(f"epoch {epoch + 1}: test accuracy {accuracy(model, test):.3f}, epsilon {epsilon:.3f}")
    return epsilon


if __name__ == "__main__":
    main()
