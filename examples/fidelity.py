"""Know what you drop: gradient fidelity per layer, a γ per layer tuned to a floor, a monitor.

Trains the demo's digits ResNet for one epoch with DropIT (γ = 0.9 everywhere, D = 1024) while a
FidelityMonitor prints the model's weight-gradient cosine every 5 steps, then prints the fidelity
report of one batch and the plan ``dc.tune`` makes for a cosine floor, and checks the plan on the
batch. Needs scikit-learn (the digits); ``--plot PATH`` also needs matplotlib.

    python examples/fidelity.py [--min-cosine 0.9] [--plot fidelity.png]
"""

import argparse
import copy

import torch
import torch.nn.functional as F

import dropit_cuda as dc

try:  # the demo's network (the demo package's digits task)
    from dropit_cuda.demo.digits import DigitsResNet
except ImportError:
    from dropit_cuda.demo import DigitsResNet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--min-cosine", type=float, default=0.9)
    parser.add_argument("--plot", default=None, help="write the fidelity report's figure here")
    args = parser.parse_args()
    from sklearn.datasets import load_digits

    torch.manual_seed(0)
    torch.set_num_threads(1)
    digits = load_digits()
    x_all = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1)
    x_all = (x_all - x_all.mean()) / x_all.std()
    y_all = torch.tensor(digits.target)
    model = dc.convert(DigitsResNet(), gamma=0.9, chunk=1024)
    plain = copy.deepcopy(model)  # same initial weights; converted below only for the plan check

    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    monitor = dc.FidelityMonitor(model, every=5, callback=lambda step, rep: print(
        f"step {step:3d}: model weight-gradient cosine {rep.cosine:.4f}"))
    perm = torch.randperm(len(y_all))
    for step in range(len(y_all) // 64):
        idx = perm[step * 64:(step + 1) * 64]
        x, y = x_all[idx], y_all[idx]
        monitor.step(x)  # mean-square loss: the default, no labels needed
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    x, y = x_all[:256], y_all[:256]
    loss_fn = lambda out: F.cross_entropy(out, y)  # noqa: E731
    report = dc.fidelity(model, x, loss_fn=loss_fn)
    print()
    print(report)
    if args.plot:
        print(f"figure: {report.plot(args.plot)}")
    plan = dc.tune(model, x, loss_fn=loss_fn, min_cosine=args.min_cosine)
    print()
    print(plan)
    # the plan applied: every layer meets the floor on this batch
    plain.load_state_dict(model.state_dict())
    dc.convert(plain, gamma=plan, chunk=1024)
    check = dc.fidelity(plain, x, loss_fn=loss_fn)
    worst = min(check.measured, key=lambda r: r.cosine)
    predicted = sum(r.cached_bytes for r in plan.tuned if r.gamma is not None)
    print(f"\nplan applied: worst layer {worst.name} at cosine {worst.cosine:.4f}; its DropIT layers "
          f"cached {check.cached_bytes} bytes (the plan predicted {predicted})")


if __name__ == "__main__":
    main()
