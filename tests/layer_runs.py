"""A fresh training step of one SnellaLinear, for tests that compare runs."""


def fresh_step(layer, x):
    """Forward and backward of ``layer`` on ``x`` with τ selected anew: the output, then the
    gradients of x and of the first adapter's parameters. The layer's gradients are cleared."""
    layer.primary._threshold_key = None
    x_leaf = x.clone().requires_grad_()
    output = layer(x_leaf)
    output.square().sum().backward()
    grads = [x_leaf.grad] + [p.grad.clone() for p in layer.primary.parameters()]
    layer.zero_grad(set_to_none=True)
    return [output.detach()] + grads
