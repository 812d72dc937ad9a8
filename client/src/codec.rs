//! The two streaming calls that carry records, made with the client's own codecs:
//! publish requests go out already written ([`EncodedPublishRequest`]), and
//! delivery batches are read straight into deliveries ([`read_deliveries`]). The
//! bytes on the wire are the same as with the generated client; everything else
//! uses the generated client.

use bytes::Buf;
use switchyard_proto::{self as pb, EncodedPublishRequest, read_deliveries_as};
use tonic::Status;
use tonic::client::Grpc;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder, Streaming};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Channel;
use tonic_prost::{ProstDecoder, ProstEncoder};

use crate::subscriber::SubscriberEvent;

/// What a subscribe stream carries to the client.
#[derive(Debug)]
pub(crate) enum Incoming {
    /// A batch of deliveries, each already the event the application gets.
    Deliveries(Vec<SubscriberEvent>),
    /// Any other event, decoded by prost.
    Other(pb::SubscribeResponse),
}

/// `Subscribe`: requests encoded by prost, responses read by [`SubscribeDecoder`].
#[derive(Debug, Default)]
struct SubscribeCodec;

impl Codec for SubscribeCodec {
    type Encode = pb::SubscribeRequest;
    type Decode = Incoming;
    type Encoder = ProstEncoder<pb::SubscribeRequest>;
    type Decoder = SubscribeDecoder;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::default()
    }

    fn decoder(&mut self) -> Self::Decoder {
        SubscribeDecoder
    }
}

#[derive(Debug)]
struct SubscribeDecoder;

impl Decoder for SubscribeDecoder {
    type Item = Incoming;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Incoming>, Status> {
        // The whole message, shared with the receive buffer (no copy).
        let message = src.copy_to_bytes(src.remaining());
        let event = |delivery: pb::ReceivedDelivery| SubscriberEvent::Delivery(delivery.into());
        match read_deliveries_as(&message, event) {
            Ok(Some(deliveries)) => Ok(Some(Incoming::Deliveries(deliveries))),
            // Another event, or bytes the reader does not take: prost decides, so
            // errors (and any case the reader does not cover) are prost's.
            Ok(None) | Err(_) => <pb::SubscribeResponse as prost::Message>::decode(message)
                .map(|response| Some(Incoming::Other(response)))
                .map_err(|error| Status::internal(error.to_string())),
        }
    }
}

/// `PublishStream`: requests already written, responses decoded by prost.
#[derive(Debug, Default)]
struct PublishCodec;

impl Codec for PublishCodec {
    type Encode = EncodedPublishRequest;
    type Decode = pb::PublishResponse;
    type Encoder = PublishEncoder;
    type Decoder = ProstDecoder<pb::PublishResponse>;

    fn encoder(&mut self) -> Self::Encoder {
        PublishEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder::default()
    }
}

#[derive(Debug)]
struct PublishEncoder;

impl Encoder for PublishEncoder {
    type Item = EncodedPublishRequest;
    type Error = Status;

    fn encode(
        &mut self,
        request: EncodedPublishRequest,
        buf: &mut EncodeBuf<'_>,
    ) -> Result<(), Status> {
        buf.reserve(request.encoded_len());
        request.encode(buf);
        Ok(())
    }
}

async fn streaming<C>(
    grpc: &mut Grpc<Channel>,
    method: &'static str,
    path: &'static str,
    requests: impl tokio_stream::Stream<Item = C::Encode> + Send + 'static,
    codec: C,
) -> Result<Streaming<C::Decode>, Status>
where
    C: Codec,
    C::Encode: Sync,
    C::Decode: Sync,
{
    grpc.ready()
        .await
        .map_err(|error| Status::unknown(format!("Service was not ready: {error}")))?;
    let mut request = tonic::Request::new(requests);
    request
        .extensions_mut()
        .insert(tonic::GrpcMethod::new("switchyard.v1.Broker", method));
    Ok(grpc
        .streaming(request, PathAndQuery::from_static(path), codec)
        .await?
        .into_inner())
}

/// Opens a `Subscribe` stream.
pub(crate) async fn subscribe(
    grpc: &mut Grpc<Channel>,
    requests: impl tokio_stream::Stream<Item = pb::SubscribeRequest> + Send + 'static,
) -> Result<Streaming<Incoming>, Status> {
    streaming(
        grpc,
        "Subscribe",
        "/switchyard.v1.Broker/Subscribe",
        requests,
        SubscribeCodec,
    )
    .await
}

/// Opens a `PublishStream`.
pub(crate) async fn publish_stream(
    grpc: &mut Grpc<Channel>,
    requests: impl tokio_stream::Stream<Item = EncodedPublishRequest> + Send + 'static,
) -> Result<Streaming<pb::PublishResponse>, Status> {
    streaming(
        grpc,
        "PublishStream",
        "/switchyard.v1.Broker/PublishStream",
        requests,
        PublishCodec,
    )
    .await
}
