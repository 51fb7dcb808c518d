// A no-op Envoy ext_proc server in Go, the reference floor for benchmarks/bench_extproc_floor.py.
//
// It answers every ext_proc message with an empty reply of the right kind, exactly like the
// Python no-op server in that benchmark: the request-body reply sets x-extproc-tier: passthrough
// and clears the route cache. It needs no generated code: a raw-bytes codec passes messages
// through, the phase is the first tag byte of the ProcessingRequest (fields 2..7, which Envoy
// serialises first), and the replies are ProcessingResponse messages serialised once by hand
// (bench_extproc_floor.py checks them against the protobuf types). grpc.health.v1 Check answers
// SERVING so Envoy's health check passes.
//
// Built by the benchmark with Debian's golang-go and golang-google-grpc-dev (GOPATH mode, offline):
//
//	GO111MODULE=off GOPATH=/usr/share/gocode go build -o noop main.go
//	./noop PORT
package main

import (
	"log"
	"net"
	"os"

	"google.golang.org/grpc"
)

type rawCodec struct{}

func (rawCodec) Marshal(v interface{}) ([]byte, error) { return *(v.(*[]byte)), nil }
func (rawCodec) Unmarshal(data []byte, v interface{}) error {
	p := v.(*[]byte)
	*p = append((*p)[:0], data...)
	return nil
}
func (rawCodec) String() string { return "proto" }
func (rawCodec) Name() string   { return "proto" }

var replies = map[byte][]byte{
	0x12: {0x0a, 0x00},
	0x1a: {0x12, 0x00},
	0x22: {0x1a, 0x27, 0x0a, 0x25, 0x12, 0x21, 0x0a, 0x1f, 0x0a, 0x1d, 0x0a, 0x0e, 0x78, 0x2d, 0x65, 0x78, 0x74, 0x70, 0x72, 0x6f, 0x63, 0x2d, 0x74, 0x69, 0x65, 0x72, 0x1a, 0x0b, 0x70, 0x61, 0x73, 0x73, 0x74, 0x68, 0x72, 0x6f, 0x75, 0x67, 0x68, 0x28, 0x01},
	0x2a: {0x22, 0x00},
	0x32: {0x2a, 0x00},
	0x3a: {0x32, 0x00},
}

func handler(srv interface{}, stream grpc.ServerStream) error {
	method, _ := grpc.MethodFromServerStream(stream)
	if method == "/grpc.health.v1.Health/Check" {
		var in []byte
		if err := stream.RecvMsg(&in); err != nil {
			return err
		}
		out := []byte{0x08, 0x01}
		return stream.SendMsg(&out)
	}
	for {
		var in []byte
		if err := stream.RecvMsg(&in); err != nil {
			return nil
		}
		if len(in) == 0 {
			continue
		}
		out := replies[in[0]]
		if err := stream.SendMsg(&out); err != nil {
			return err
		}
	}
}

func main() {
	lis, err := net.Listen("tcp", "127.0.0.1:"+os.Args[1])
	if err != nil {
		log.Fatal(err)
	}
	s := grpc.NewServer(grpc.CustomCodec(rawCodec{}), grpc.UnknownServiceHandler(handler))
	log.Fatal(s.Serve(lis))
}
