// train_mnist.cpp - Drop-Muon in a LibTorch C++ training loop: the paper's CNN on the MNIST
// digits shipped with the package (8,000 train / 2,000 test, gzip IDX files). Build and run
// (from the repository root):
//
//   cmake -S . -B build/cpp -DDM_BUILD_CPP=ON -DDM_BUILD_TESTS=OFF \
//         -DCMAKE_PREFIX_PATH="$(python3 -c 'import torch.utils;
//         print(torch.utils.cmake_prefix_path)')"
//   cmake --build build/cpp --target train_mnist -j && build/cpp/train_mnist [steps] [sampling]
//
// Prints the test accuracy every 100 steps and the training time (evaluation off the clock).
#include <torch/torch.h>
#include <zlib.h>

#include <chrono>
#include <cstdio>
#include <stdexcept>
#include <string>
#include <vector>

#include "dropmuon/optim.h"

#ifndef DM_MNIST_DIR
#define DM_MNIST_DIR "python/dropmuon/compare/datasets/mnist-10k"
#endif

namespace {

// The paper's CNN (python/dropmuon/compare/models.py, PaperCNN): three conv3x3 - ReLU - maxpool2
// blocks (64, 128, 256 channels) and a linear head; four layers, registered input first.
struct PaperCNNImpl : torch::nn::Module {
    PaperCNNImpl() {
        int64_t c_in = 1;
        for (int64_t c_out : {64, 128, 256}) {
            convs.push_back(register_module(
                "conv" + std::to_string(convs.size() + 1),
                torch::nn::Conv2d(torch::nn::Conv2dOptions(c_in, c_out, 3).padding(1))));
            c_in = c_out;
        }
        head = register_module("head", torch::nn::Linear(256 * 3 * 3, 10));
    }
    torch::Tensor forward(torch::Tensor x) {
        for (auto &conv : convs) x = torch::max_pool2d(torch::relu(conv->forward(x)), 2);
        return head->forward(x.flatten(1));
    }
    std::vector<torch::nn::Conv2d> convs;
    torch::nn::Linear head{nullptr};
};
TORCH_MODULE(PaperCNN);

// An IDX file (gzip-compressed): its dimensions and its bytes.
torch::Tensor read_idx(const std::string &path) {
    gzFile file = gzopen(path.c_str(), "rb");
    if (file == nullptr) throw std::runtime_error("cannot open " + path);
    std::vector<unsigned char> bytes;
    unsigned char chunk[1 << 16];
    int n = 0;
    while ((n = gzread(file, chunk, sizeof chunk)) > 0) bytes.insert(bytes.end(), chunk, chunk + n);
    gzclose(file);
    if (bytes.size() < 4 || bytes[2] != 0x08) throw std::runtime_error(path + ": not IDX uint8");
    const int dims = bytes[3];
    std::vector<int64_t> shape;
    size_t offset = 4, count = 1;
    for (int d = 0; d < dims; ++d, offset += 4) {
        shape.push_back((int64_t(bytes[offset]) << 24) | (bytes[offset + 1] << 16) |
                        (bytes[offset + 2] << 8) | bytes[offset + 3]);
        count *= static_cast<size_t>(shape.back());
    }
    if (bytes.size() != offset + count) throw std::runtime_error(path + ": truncated");
    return torch::from_blob(bytes.data() + offset, shape, torch::kUInt8).clone();
}

torch::Tensor images(const std::string &path) {
    return ((read_idx(path).to(torch::kFloat) / 255.0 - 0.1307) / 0.3081).unsqueeze(1);
}

double accuracy(PaperCNN &net, const torch::Tensor &x, const torch::Tensor &y) {
    torch::NoGradGuard no_grad;
    int64_t correct = 0;
    for (int64_t i = 0; i < x.size(0); i += 500) {
        const auto logits = net->forward(x.narrow(0, i, std::min<int64_t>(500, x.size(0) - i)));
        correct += (logits.argmax(1) == y.narrow(0, i, logits.size(0))).sum().item<int64_t>();
    }
    return static_cast<double>(correct) / static_cast<double>(x.size(0));
}

} // namespace

int main(int argc, char **argv) {
    const int64_t steps = argc > 1 ? std::stoll(argv[1]) : 300;
    const std::string sampling = argc > 2 ? argv[2] : "uniform";
    const std::string dir = DM_MNIST_DIR;
    const torch::Tensor train_x = images(dir + "/train-images-idx3-ubyte.gz");
    const torch::Tensor train_y = read_idx(dir + "/train-labels-idx1-ubyte.gz").to(torch::kLong);
    const torch::Tensor test_x = images(dir + "/t10k-images-idx3-ubyte.gz");
    const torch::Tensor test_y = read_idx(dir + "/t10k-labels-idx1-ubyte.gz").to(torch::kLong);

    torch::manual_seed(0);
    PaperCNN net;
    dropmuon::DropMuon opt(*net, dropmuon::DropMuonOptions(0.05).sampling(sampling).total_steps(
                                     sampling == "epoch_shift" ? steps : 0));
    std::printf("%lld layers, sampling %s, %lld steps of batch 128 on %lld training images\n",
                static_cast<long long>(opt.num_layers()), sampling.c_str(),
                static_cast<long long>(steps), static_cast<long long>(train_x.size(0)));

    const int64_t batch = 128, per_epoch = train_x.size(0) / batch;
    torch::Tensor order;
    double seconds = 0.0;
    for (int64_t step = 0; step < steps; ++step) {
        if (step % per_epoch == 0) order = torch::randperm(train_x.size(0));
        const auto index = order.narrow(0, (step % per_epoch) * batch, batch);
        const auto start = std::chrono::steady_clock::now();
        opt.zero_grad();
        torch::nn::functional::cross_entropy(net->forward(train_x.index_select(0, index)),
                                             train_y.index_select(0, index))
            .backward();
        opt.step();
        seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
        if ((step + 1) % 100 == 0 || step + 1 == steps)
            std::printf("step %lld: test accuracy %.4f, %.1f s of training\n",
                        static_cast<long long>(step + 1), accuracy(net, test_x, test_y), seconds);
    }
    std::printf("updates per layer:");
    for (int64_t c : opt.update_counts()) std::printf(" %lld", static_cast<long long>(c));
    std::printf("\n");
    return 0;
}
