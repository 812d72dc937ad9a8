"""A chat-API-style producer and a gateway-style subscriber in Python, using stubs
generated from proto/switchyard/v1/broker.proto. Prints what it saw as JSON lines."""

import json
import sys

import grpc

from switchyard.v1 import broker_pb2 as pb
from switchyard.v1 import broker_pb2_grpc as rpc


def main(address: str) -> None:
    channel = grpc.insecure_channel(address)
    broker = rpc.BrokerStub(channel)

    records = [
        pb.PublishRecord(
            topic="guild.py",
            headers=[pb.Header(key="type", value="MESSAGE_CREATE")],
            payload=json.dumps({"content": f"hello {i}"}).encode(),
        )
        for i in range(3)
    ]
    published = broker.Publish(
        pb.PublishRequest(request_id=1, records=records, ack=pb.ACK_LEVEL_DURABLE)
    )
    print(json.dumps({"published": [[p.offset, p.epoch] for p in published.positions]}))

    try:
        broker.Publish(pb.PublishRequest(records=[pb.PublishRecord(topic="bad topic")]))
    except grpc.RpcError as error:
        print(json.dumps({"refused": error.code().name, "message": error.details()}))

    def commands():
        yield pb.SubscribeRequest(
            add=pb.Subscription(
                id=7,
                topic="guild.py",
                start=pb.StartPosition(earliest=pb.Earliest()),
            )
        )
        # Keep the request side open until the deliveries are in.
        done.wait()

    import threading

    done = threading.Event()
    seen = []
    stream = broker.Subscribe(commands(), timeout=20)
    for response in stream:
        if response.HasField("update"):
            print(json.dumps({"update": response.update.WhichOneof("state")}))
        for delivery in response.deliveries.deliveries:
            seen.append(
                {
                    "offset": delivery.offset,
                    "ids": list(delivery.subscription_ids),
                    "type": delivery.headers[0].value,
                    "payload": json.loads(delivery.payload),
                }
            )
        if len(seen) >= 3:
            break
    done.set()
    stream.cancel()
    print(json.dumps({"delivered": seen}))


if __name__ == "__main__":
    main(sys.argv[1])
